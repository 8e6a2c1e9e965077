-- handback_one.lua (one server): handback.lua and release.lua in one call (and, when the failure was
-- the request's last allowed attempt, ready.lua for the session's next head).
-- KEYS[1] the request's data prefix sg:{s:<bucket>}:   KEYS[2] the worker's group's control prefix
-- ARGV[1] flags   ARGV[2] lease ms   ARGV[3] request id   ARGV[4] attempt   ARGV[5] worker id
-- ARGV[6] reason   ARGV[7] return the slot's ticket ("1" | "0")   ARGV[8] max attempts
-- ARGV[9] session ttl s
-- Returns {stopped 1|0, status before}.
local now, lease = clock(), tonumber(ARGV[2])
local rid, attempt = ARGV[3], ARGV[4]
local stopped, status, produced, spec, nxt = d_stop(rid, attempt, ARGV[5], ARGV[6], tonumber(ARGV[8]), now,
  tonumber(ARGV[9]), false)
let_go(KEYS[2], rid .. '|' .. attempt, ARGV[5], produced, spec, ARGV[7], now, lease, nxt)
return { stopped and 1 or 0, status }
