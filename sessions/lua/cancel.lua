-- cancel.lua (data plane, cluster): cancel a queued, preempted or running request and advance its
-- session; the caller then withdraws it from its group (withdraw.lua) and readies the next head.
-- KEYS[1] the request's data prefix sg:{s:<bucket>}:
-- ARGV[1] flags   ARGV[2] session ttl s   ARGV[3] request id   ARGV[4] owner to enforce ("" = none)
-- Returns {"cancelled", group, attempt, session id, produced (-1), next head spec JSON or ""} |
-- {"terminal", status} | {"missing"} | {"forbidden"}.
local outcome, r, produced, nxt = d_cancel(ARGV[3], ARGV[4], clock(), tonumber(ARGV[2]), true)
if outcome ~= 'cancelled' then return { outcome, r.st } end
return { outcome, r.g, r.a, r.sid, produced or -1, nxt and cjson.encode(nxt) or '' }
