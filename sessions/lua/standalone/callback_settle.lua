-- callback_settle.lua (run with EVAL by the delivery process): record how a claimed delivery attempt
-- went, in the request (`cbs` status, `cbe` last error: GET /v1/requests/{id} shows them as `callback`).
-- Ignored when another attempt was claimed since (this one's lease ran out). A retry's request is kept for
-- at least ARGV[6] ms more, past its session's TTL if need be: until its retry is due and as long as a claim
-- keeps it past that (the callback's payload is the request hash). A final outcome's is kept ARGV[6] ms more
-- (long enough for it to be read), or until its own TTL (ARGV[7] ms after its end, `fin`) when that is
-- later: what the claims kept it past that TTL for is over, so its TTL may shorten.
-- KEYS[1] the bucket's due callbacks sg:{s:<bucket>}:cb   KEYS[2] the request hash sg:{s:<bucket>}:r:<rid>
-- ARGV[1] request id   ARGV[2] attempt number   ARGV[3] "delivered" | "retry" | "failed"
-- ARGV[4] error ("" = none)   ARGV[5] when to retry (ms; "retry" only)   ARGV[6] ms to keep the request
-- ARGV[7] the session's TTL (ms)
-- Returns 1 | 0 when ignored.
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
if tonumber(redis.call('HGET', KEYS[2], 'cbn') or '0') ~= tonumber(ARGV[2]) then return 0 end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], 'cbe', ARGV[4]) end
if ARGV[3] == 'retry' then
  redis.call('PEXPIRE', KEYS[2], ARGV[6], 'GT')  -- only longer: a key without a TTL is left so
  redis.call('ZADD', KEYS[1], tonumber(ARGV[5]), ARGV[1])
  return 1
end
redis.call('HSET', KEYS[2], 'cbs', ARGV[3])
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[2]) > 0 then  -- a key without a TTL is left so
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local own = (tonumber(redis.call('HGET', KEYS[2], 'fin')) or 0) + tonumber(ARGV[7]) - now
  redis.call('PEXPIRE', KEYS[2], math.floor(math.max(tonumber(ARGV[6]), own)))  -- `fin` has a fraction
end
return 1
