-- pin.lua (control plane): a run is about to stream output that a resume could not continue (a
-- tool-call delta: an engine continues text, not a half-made tool call), so it must not be
-- preempted from here on. Kept only while it is still running: a run the control plane already
-- stopped (preempted, cancelled) is refused, and its worker must not write that output.
-- KEYS[1] the group's control prefix sg:{g:<group>}:
-- ARGV[1] flags   ARGV[2] "rid|attempt"
-- Returns 1 pinned (end_run forgets it) | 0 the run is no longer running.
local cp, key = KEYS[1], ARGV[2]
if not redis.call('ZSCORE', cp .. 'run', key) then return 0 end
redis.call('SADD', cp .. 'pin', key)
return 1
