-- finish_one.lua (one server): finish.lua, release.lua and ready.lua for the session's next head in
-- one call: end the run, advance the session, give the slot back and fill it at once.
-- KEYS[1] the request's data prefix sg:{s:<bucket>}:   KEYS[2] the worker's group's control prefix
-- ARGV[1] flags   ARGV[2] lease ms   ARGV[3] session ttl s   ARGV[4] request id   ARGV[5] attempt
-- ARGV[6] worker id   ARGV[7] outcome ("done" | "failed")   ARGV[8] finish_reason or error message (as
--         finish.lua's ARGV[7])
-- ARGV[9] return the slot's ticket ("1" | "0")
-- ARGV[10] the backend's usage for the whole request, JSON, or "" (none reported)
-- ARGV[11] ARGV[12] ARGV[13..] the run's last tokens, appended before the run ends: as finish.lua's
--         ARGV[9] ARGV[10] ARGV[11..]
-- Returns {finished 1|0, status before}.
local now, lease = clock(), tonumber(ARGV[2])
local rid, attempt = ARGV[4], ARGV[5]
local usage = ARGV[10] -- its text, kept as it is (usage_of, requests.lua)
local r = append_tail(KEYS[1], rid, attempt, ARGV[6], ARGV[11] or '', ARGV[12] or '', ARGV, 13)
local finished, status, produced, nxt, requeue, prompt = d_finish(rid, attempt, ARGV[6], ARGV[7], ARGV[8], usage,
  now, tonumber(ARGV[3]), false, r)
let_go(KEYS[2], rid .. '|' .. attempt, ARGV[6], produced, requeue, ARGV[9], now, lease, nxt, prompt)
return { finished and 1 or 0, status }
