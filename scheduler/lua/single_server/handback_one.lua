-- handback_one.lua (one server): handback.lua and release.lua in one call.
-- KEYS[1] the request's data prefix sg:{s:<bucket>}:   KEYS[2] the worker's group's control prefix
-- ARGV[1] flags   ARGV[2] lease ms   ARGV[3] request id   ARGV[4] attempt   ARGV[5] worker id
-- ARGV[6] reason   ARGV[7] return the slot's ticket ("1" | "0")
-- Returns {stopped 1|0, status before}.
local now, lease = clock(), tonumber(ARGV[2])
local rid, attempt = ARGV[3], ARGV[4]
local stopped, status, produced, spec = d_stop(rid, attempt, ARGV[5], ARGV[6])
let_go(KEYS[2], rid .. '|' .. attempt, ARGV[5], produced, spec, ARGV[7], now, lease)
return { stopped and 1 or 0, status }
