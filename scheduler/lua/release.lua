-- release.lua (control plane, cluster): a worker lets go of a run (after finish.lua or
-- handback.lua), or the sweep closes a lost worker's run: reconcile its charges, requeue its
-- request when it goes back to wait, give the slot's ticket back, and fill the freed slot.
-- Idempotent: a repeated call finds no run record and only returns the ticket (when asked).
-- KEYS[1] the group's control prefix sg:{g:<group>}:
-- ARGV[1] flags   ARGV[2] lease ms   ARGV[3] "rid|attempt"   ARGV[4] worker id
-- ARGV[5] tokens the run produced (-1 unknown)   ARGV[6] ready spec JSON to requeue, or ""
-- ARGV[7] the slot: "1" its ticket comes back, "0" let go without one (leaving), "keep" (the sweep)
-- ARGV[8] the request's input tokens as the backend counted them (-1 unknown; absent = unknown)
-- Returns the number of requests dispatched.
local produced = tonumber(ARGV[5])
local prompt = tonumber(ARGV[8] or '-1')
local requeue = ARGV[6] ~= '' and cjson.decode(ARGV[6]) or nil
return let_go(KEYS[1], ARGV[3], ARGV[4], produced >= 0 and produced or nil, requeue, ARGV[7], clock(),
  tonumber(ARGV[2]), nil, prompt >= 0 and prompt or nil)
