-- set_weight.lua (control plane): an operator's new weight for a tenant (scheduler/admin.py set_weight),
-- written to the group's copy, where its decisions read it, and applied to fair-share preemption in the
-- same step: the tenant's share of the running slots (ro, its runs / its weight) is rescored at the new
-- weight (runs.lua rescore_share), or preemption would rank it by its old weight until its next start or
-- stop (a raised weight preempted a tenant at its share and then back: a ping-pong; a lowered flooder's
-- weight took no slot back). A swap now due is left to the next decision: the hint wakes the group's
-- scheduler loop for a sweep.
-- Also how a group's copy is brought back to the source (sessions/registry.py copy_policy: a scheduler's
-- start, a new group), with every tenant whose copy differs, so that the copy and ro agree there too.
-- KEYS[1] the group's control prefix sg:{g:<group>}:
-- ARGV[1] flags   ARGV[2], ARGV[3], ... pairs of a tenant and its weight (as stored in sg:tenants)
-- Returns the runs those tenants hold in the group.
local cp, held = KEYS[1], 0
for i = 2, #ARGV - 1, 2 do
  redis.call('HSET', cp .. 'tw', ARGV[i], ARGV[i + 1])
  held = held + rescore_share(cp, ARGV[i])
end
hint_scheduler(cp)
return held
