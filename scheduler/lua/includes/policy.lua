-- policy.lua: the scheduling policy and tenant weights, as the group's control plane holds them
-- (copies of sg:policy and sg:tenants, written by scheduler/policy.py and the admin API, so that a
-- decision reads only its group's slot). Defaults come from sluicegate/settings.py.

local POLICY_DEFAULTS = { {{POLICY_DEFAULTS}} }
local policy_cache, policy_of, policy_call = nil, nil, -1 -- per call and group: an admin may change it

local function policy(cp)
  if policy_cache and policy_of == cp and policy_call == call_id then return policy_cache end
  policy_cache, policy_of, policy_call = {}, cp, call_id
  for name, value in pairs(POLICY_DEFAULTS) do policy_cache[name] = value end
  local stored = redis.call('HGETALL', cp .. 'pol')
  for i = 1, #stored, 2 do policy_cache[stored[i]] = tonumber(stored[i + 1]) end
  return policy_cache
end

local function weight(cp, tenant)
  return tonumber(redis.call('HGET', cp .. 'tw', tenant) or '1') or 1
end

local function cmetrics(cp) return cp .. 'm' end
