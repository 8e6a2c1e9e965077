-- handback.lua (data plane, cluster): stop a run and put its request back to wait (preempted,
-- cancelled, worker shutting down or lost, backend failed after tokens streamed); it resumes from the
-- tokens so far. The caller then releases the run on the control plane (release.lua).
-- KEYS[1] the request's data prefix sg:{s:<bucket>}:
-- ARGV[1] flags   ARGV[2] request id   ARGV[3] attempt   ARGV[4] worker id ("" = whoever runs it:
-- the sweep, for a lost worker)   ARGV[5] reason ("label" or "label: detail")
-- Returns {stopped 1|0, status before, produced (-1 unknown), ready spec JSON to requeue or ""}.
local wid = ARGV[4] ~= '' and ARGV[4] or nil
local stopped, status, produced, spec = d_stop(ARGV[2], ARGV[3], wid, ARGV[5])
return { stopped and 1 or 0, status, produced or -1, spec and cjson.encode(spec) or '' }
