-- ended.lua: what a request's end leaves behind for the processes that act after it. The terminal
-- step (finalize, requests.lua) calls `ended` once per request, in the request's bucket, so both
-- keys below share its hash tag and nothing is lost between the end and what follows it:
--   cb  zset  request id -> when its callback is due (ms), for requests submitted with a callback_url
--             (field `cb`): the delivery process (webhooks/delivery.py) POSTs their final status
--   u   hash  "hour|tenant|group|r" (requests), "...|i" (input tokens), "...|o" (output tokens):
--             usage not yet folded into the fleet-wide hourly hashes sg:usage:<hour> (sessions/usage.py)

local USAGE_PENDING_TTL = 35 * 86400 -- seconds: as long as the folded hours are kept

local function ended(rid, now)
  local dp = dpre_of(rid)
  local v = redis.call('HMGET', kreq(rid), 'cb', 'tn', 'g', 'it', 'n', 'us', 'sa')
  if v[1] then redis.call('ZADD', dp .. 'cb', 'NX', now, rid) end
  -- Input tokens count once the request started (one that never ran cost nothing); the backend's
  -- usage, when the request is done, wins over Sluicegate's counts.
  local input, output = v[7] and (tonumber(v[4]) or 0) or 0, tonumber(v[5]) or 0
  if v[6] then
    local ok, usage = pcall(cjson.decode, v[6])
    if ok and type(usage) == 'table' then
      input = tonumber(usage.prompt_tokens) or input
      output = tonumber(usage.completion_tokens) or output
    end
  end
  local field = string.format('%d|%s|%s|', math.floor(now / 3600000) * 3600, v[2] or '', v[3] or '')
  local key = dp .. 'u'
  redis.call('HINCRBY', key, field .. 'r', 1)
  if input > 0 then redis.call('HINCRBY', key, field .. 'i', input) end
  if output > 0 then redis.call('HINCRBY', key, field .. 'o', output) end
  redis.call('EXPIRE', key, USAGE_PENDING_TTL)
end
