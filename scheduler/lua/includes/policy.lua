-- policy.lua: the scheduling policy and tenant weights, as the group's control plane holds them
-- (copies of sg:policy and sg:tenants, written by scheduler/policy.py and the admin API, so that a
-- decision reads only its group's slot). Defaults come from sluicegate/settings.py.

local POLICY_DEFAULTS = { {{POLICY_DEFAULTS}} }
-- Read once per call and group (call.lua per_call): an admin may change it between calls.
local function policy(cp)
  local key = 'policy|' .. cp
  local pol = per_call[key]
  if pol then return pol end
  pol = {}
  for name, value in pairs(POLICY_DEFAULTS) do pol[name] = value end
  local stored = redis.call('HGETALL', cp .. 'pol')
  for i = 1, #stored, 2 do pol[stored[i]] = tonumber(stored[i + 1]) end
  per_call[key] = pol
  return pol
end

local function weight(cp, tenant)
  return tonumber(redis.call('HGET', cp .. 'tw', tenant) or '1') or 1
end

local function cmetrics(cp) return cp .. 'm' end
