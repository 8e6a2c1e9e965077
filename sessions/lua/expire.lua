-- expire.lua (data plane, cluster): end a waiting request whose deadline passed with
-- "on_deadline_miss": "fail" (the sweep returned it); the caller then withdraws it from its group
-- (withdraw.lua) and readies the session's next head. On one server the sweep does all of it at once.
-- KEYS[1] the request's data prefix sg:{s:<bucket>}:
-- ARGV[1] flags   ARGV[2] session ttl s   ARGV[3] request id   ARGV[4] the sweep's clock (ms): the
-- deadline is judged by the control plane's clock that found it passed, not this node's
-- ARGV[5] "behind" when the sweep found it in dlq (submitted behind its session's head): kept once it is
-- the head (absent or "": found in dld)
-- Returns {"expired", group, attempt, session id, next head spec JSON or ""} | {"kept"}.
local outcome, r, nxt = d_expire(ARGV[3], tonumber(ARGV[4]) or clock(), tonumber(ARGV[2]), true, ARGV[5] == 'behind')
if outcome ~= 'expired' then return { outcome } end
return { outcome, r.g, r.a, r.sid, nxt and cjson.encode(nxt) or '' }
