-- cancel_one.lua (one server): cancel.lua, withdraw.lua and ready.lua for the next head in one call.
-- KEYS[1] the request's data prefix sg:{s:<bucket>}:
-- ARGV[1] flags   ARGV[2] lease ms   ARGV[3] session ttl s   ARGV[4] request id   ARGV[5] owner ("" = none)
-- Returns {"cancelled"} | {"terminal", status} | {"missing"} | {"forbidden"}.
local now, lease = clock(), tonumber(ARGV[2])
local rid = ARGV[4]
local outcome, r, produced, nxt = d_cancel(rid, ARGV[5], now, tonumber(ARGV[3]), false)
if outcome ~= 'cancelled' then return { outcome, r.st } end
withdraw(gpre(r.g), rid, r.a, r.sid, produced, now, lease)
-- A `fail` deadline noted while it waited behind its session's head (dlq) would stay up to that deadline
-- after the session is gone: only readying it (dispatch.lua ready) or the sweep at its deadline took it out.
if r.dl then redis.call('ZREM', gpre(r.g) .. 'dlq', rid .. '|' .. r.sid) end
if nxt then ready(gpre(nxt.g), nxt, now, lease) end
return { outcome }
