-- ended.lua: what a request's end leaves behind for the processes that act after it. The terminal
-- step (finalize, requests.lua) calls `ended` once per request, in the request's bucket, so both
-- keys below share its hash tag and nothing is lost between the end and what follows it:
--   cb  zset  request id -> when its callback is due (ms), for requests submitted with a callback_url
--             (field `cb`): the delivery process (webhooks/delivery.py) POSTs their final status
--   u   hash  "hour|tenant|group|r" (requests), "...|i" (input tokens), "...|o" (output tokens):
--             usage not yet folded into the fleet-wide hourly hashes sg:usage:<hour> (sessions/usage.py)

local USAGE_PENDING_TTL = 35 * 86400 -- seconds: as long as the folded hours are kept
-- A count is believed (a backend's, a stored one) only as a whole number in [0, 2^53): exact in a double,
-- and far below the 2^63 HINCRBY takes. A bigger one (a backend's "prompt_tokens": 1e20) would make the
-- end raise half-written; usage_of (requests.lua) then uses Sluicegate's counts instead.
local MAX_COUNT = 9007199254740992 -- 2^53
local function sane_count(x)
  if type(x) == 'number' and x >= 0 and x < MAX_COUNT and x == math.floor(x) then return x end
  return nil
end

local function ended(rid, now)
  local dp = dpre_of(rid)
  local v = redis.call('HMGET', kreq(rid), 'cb', 'tn', 'g', 'it', 'n', 'us', 'sa')
  if v[1] then redis.call('ZADD', dp .. 'cb', 'NX', now, rid) end
  -- Input tokens count once the request started (one that never ran cost nothing); the backend's
  -- usage, when the request is done, wins over Sluicegate's counts.
  local input, output = v[7] and (sane_count(tonumber(v[4])) or 0) or 0, sane_count(tonumber(v[5])) or 0
  if v[6] then
    local ok, usage = pcall(cjson.decode, v[6])
    if ok and type(usage) == 'table' then
      input = sane_count(usage.prompt_tokens) or input
      output = sane_count(usage.completion_tokens) or output
    end
  end
  local field = string.format('%d|%s|%s|', math.floor(now / 3600000) * 3600, v[2] or '', v[3] or '')
  local key = dp .. 'u'
  -- The end is half-written already (finalize): a count that cannot be added (a pending total past
  -- 2^63) is dropped rather than raised, which would leave the request done without its end event.
  redis.pcall('HINCRBY', key, field .. 'r', 1)
  if input > 0 then redis.pcall('HINCRBY', key, field .. 'i', string.format('%d', input)) end
  if output > 0 then redis.pcall('HINCRBY', key, field .. 'o', string.format('%d', output)) end
  redis.call('EXPIRE', key, USAGE_PENDING_TTL)
end
