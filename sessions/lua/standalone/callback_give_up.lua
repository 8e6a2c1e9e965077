-- callback_give_up.lua (run with EVAL by the delivery process, webhooks/delivery.py: a pipeline of them a
-- pass): a due callback that waits for a place of its receiver's host while its receiver (its URL's origin)
-- has given no attempt a timely success for a whole retry schedule (sessions/callbacks.py `silent_origins`),
-- is marked failed unsent, as a last failed attempt marks it (callback_settle.lua): `cbs` failed, `cbe`
-- why, its attempts (`cbn`) as they are, its entry dropped and its request kept ARGV[4] ms more or until its
-- own expiry (`cbx`) when that is later.
-- Only a callback still queued and due by ARGV[2] is touched: one claimed since (due a lease on), settled
-- (no longer queued) or due later (a retry) is left to its attempt.
-- KEYS[1] the bucket's due callbacks sg:{s:<bucket>}:cb   KEYS[2] the request hash sg:{s:<bucket>}:r:<rid>
-- ARGV[1] request id   ARGV[2] now (ms)   ARGV[3] error   ARGV[4] ms to keep the request
-- Returns 1 | 0 when left.
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due or tonumber(due) > tonumber(ARGV[2]) then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
redis.call('HSET', KEYS[2], 'cbs', 'failed', 'cbe', ARGV[3])
redis.call('ZREM', KEYS[1], ARGV[1])
local own = tonumber(redis.call('HGET', KEYS[2], 'cbx'))
if own then  -- give back what the callback scripts added
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('PEXPIREAT', KEYS[2], math.max(own, now + tonumber(ARGV[4])))
  redis.call('HDEL', KEYS[2], 'cbx')
else  -- none recorded (never lengthened, or no TTL): only longer, a key without a TTL is left so
  redis.call('PEXPIRE', KEYS[2], ARGV[4], 'GT')
end
return 1
