-- handback.lua (data plane, cluster): stop a run and put its request back to wait (preempted,
-- cancelled, worker shutting down or lost, backend failed); it resumes from the tokens so far, unless
-- that failure was its last allowed attempt (--max-attempts): then it ends, failed. The caller then
-- releases the run on the control plane (release.lua) and readies the session's next head if any.
-- KEYS[1] the request's data prefix sg:{s:<bucket>}:
-- ARGV[1] flags   ARGV[2] request id   ARGV[3] attempt   ARGV[4] worker id ("" = whoever runs it:
-- the sweep, for a lost worker)   ARGV[5] reason ("label" or "label: detail")   ARGV[6] max attempts
-- ARGV[7] session ttl s
-- Returns {stopped 1|0, status before, produced (-1 unknown), ready spec JSON to requeue or "",
-- (ended) the session's next head's ready spec JSON or ""}. A worker's hand-back that ended the request,
-- resent after its reply was lost, is refused (0) with the session's waiting head (requests.lua ended_by).
local wid = ARGV[4] ~= '' and ARGV[4] or nil
local stopped, status, produced, spec, nxt = d_stop(ARGV[2], ARGV[3], wid, ARGV[5], tonumber(ARGV[6]), clock(),
  tonumber(ARGV[7]), true)
return { stopped and 1 or 0, status, produced or -1, spec and cjson.encode(spec) or '', nxt and cjson.encode(nxt) or '' }
