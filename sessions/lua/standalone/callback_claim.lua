-- callback_claim.lua (run with EVAL by the delivery process, webhooks/delivery.py): take a due callback
-- for one delivery attempt. The entry stays queued, due again after the lease: a delivery process that
-- dies mid-attempt loses nothing (another one, or its restart, tries again), and two processes never
-- try the same callback at once. The request is kept until the lease ends (the entry's next due time) and
-- ARGV[4] more (the longer of a lease and the session's TTL), past that TTL if need be: the attempt's outcome
-- can be recorded (callback_settle.lua keeps it for the retries that follow), and a delivery outage shorter
-- than the TTL after an attempt lost with its process still finds it. The request's own expiry (set when it
-- ended) is recorded first, once (`cbx`): the final outcome gives back what the callback scripts added.
-- KEYS[1] the bucket's due callbacks sg:{s:<bucket>}:cb   KEYS[2] the request hash sg:{s:<bucket>}:r:<rid>
-- ARGV[1] request id   ARGV[2] now (ms)   ARGV[3] lease (ms)   ARGV[4] ms to keep the request past the lease
-- Returns false when not due (another process holds it) | {} when the request expired (dropped) |
-- {attempt number, field, value, field, value, ...} (the request hash).
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due or tonumber(due) > tonumber(ARGV[2]) then return false end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return {}
end
redis.call('ZADD', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
if redis.call('HEXISTS', KEYS[2], 'cbx') == 0 then  -- its own expiry, before any callback script lengthens it
  local own = redis.call('PEXPIRETIME', KEYS[2])
  if own > 0 then redis.call('HSET', KEYS[2], 'cbx', own) end  -- a key without a TTL: nothing to give back
end
-- only longer: a key without a TTL is left so
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]) + tonumber(ARGV[4]), 'GT')
local fields = redis.call('HGETALL', KEYS[2])
table.insert(fields, 1, redis.call('HINCRBY', KEYS[2], 'cbn', 1))
return fields
