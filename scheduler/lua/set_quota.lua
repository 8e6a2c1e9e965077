-- set_quota.lua (control plane): an operator's quota change for a group (scheduler/admin.py set_quota), made in
-- one step in the group's slot. The fields given are set, those given as null removed; a removed rate quota's
-- state is forgotten, so that setting it again starts afresh; a removed tokens/s quota's bucket gets a new
-- generation (qs tgen), so that a run which reserved from the removed bucket refunds nothing into one set
-- again later (quotas.lua quota_refund). As separate commands a refund, a dispatch or another change could
-- land between them: a run's end seeing the field gone, or set again, under the old generation took its
-- refund into the wrong generation's bucket. The hint wakes the group's scheduler: the change applies on
-- its next decision.
-- KEYS[1] the group's control prefix sg:{g:<group>}:
-- ARGV[1] flags   ARGV[2] n, the fields to set   ARGV[3], ARGV[4], ... n pairs of a field and its value,
-- then the fields to remove
-- Returns the fields removed that were there.
local cp = KEYS[1]
local n = tonumber(ARGV[2])
local last_set = 2 + 2 * n
if n > 0 then
  local values = {}
  for i = 3, last_set do values[#values + 1] = ARGV[i] end
  redis.call('HSET', cp .. 'cfg', unpack(values))
end
local removed, stale, tokens = 0, {}, false
if #ARGV > last_set then
  local fields = {}
  for i = last_set + 1, #ARGV do
    fields[#fields + 1] = ARGV[i]
    if ARGV[i] == 'requests_per_second' then
      stale[#stale + 1] = 'tat'
      stale[#stale + 1] = 'ti'
    elseif ARGV[i] == 'tokens_per_second' then
      stale[#stale + 1] = 'lvl'
      stale[#stale + 1] = 'at'
      tokens = true
    end
  end
  removed = redis.call('HDEL', cp .. 'cfg', unpack(fields))
end
if #stale > 0 then redis.call('HDEL', cp .. 'qs', unpack(stale)) end
if tokens then redis.call('HINCRBY', cp .. 'qs', 'tgen', 1) end
hint_scheduler(cp)
return removed
