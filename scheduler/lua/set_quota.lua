-- set_quota.lua (control plane): an operator's quota change for a group (scheduler/admin.py set_quota), made in
-- one step in the group's slot. The fields given are set, those given as null removed; a removed rate quota's
-- state is forgotten, so that setting it again starts afresh; a removed tokens/s quota's bucket gets a new
-- generation (qs tgen), so that a run which reserved from the removed bucket refunds nothing into one set
-- again later (quotas.lua quota_refund). As separate commands a refund, a dispatch or another change could
-- land between them: a run's end seeing the field gone, or set again, under the old generation took its
-- refund into the wrong generation's bucket. The hint wakes the group's scheduler: the change applies on
-- its next decision.
-- A tokens/s bucket stores its level as of its last dispatch or refund (qs lvl, at) and is read as that
-- level refilled at the rate set when it is read (quotas.lua token_level): a new tokens_per_second or
-- burst_tokens would re-price the time before the change (raised 1/s -> 100/s ten seconds after the bucket
-- emptied: 1,000 tokens where the old rate gave 10; a raised burst after an hour idle: the hour's refill at
-- once). So the bucket is first brought up to now under the old settings (its old rate, capped by its old
-- burst) and stored so; the new settings apply from now on. A bucket never drawn from (no lvl) is full at
-- whatever burst applies, as before; a removed tokens/s quota's state is dropped below anyway.
-- KEYS[1] the group's control prefix sg:{g:<group>}:
-- ARGV[1] flags   ARGV[2] n, the fields to set   ARGV[3], ARGV[4], ... n pairs of a field and its value,
-- then the fields to remove
-- Returns the fields removed that were there.
local cp = KEYS[1]
local n = tonumber(ARGV[2])
local last_set = 2 + 2 * n

-- Does this change touch the tokens/s bucket's rate or size (set, or burst_tokens removed)?
local function reprices_bucket()
  for i = 3, #ARGV do
    local field = ARGV[i]
    local is_name = i > last_set or (i - 3) % 2 == 0
    if is_name and (field == 'tokens_per_second' or field == 'burst_tokens') then return true end
  end
  return false
end

if reprices_bucket() then
  -- read before the HSET below: the settings the bucket refilled under (this call reads no config after it)
  local old = quota_config(cp)
  if old.tps and redis.call('HEXISTS', cp .. 'qs', 'lvl') == 1 then
    local now = clock()
    local level = token_level(cp, old, now)
    redis.call('HSET', cp .. 'qs', 'lvl', level, 'at', now)
  end
end

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
