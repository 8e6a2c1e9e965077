-- callback_push_back.lua (run with EVAL by the delivery process, webhooks/delivery.py: a pipeline of them
-- a pass): a due callback that waits for its receiver host (full or slow) is due again later, or, held
-- by the process for one of the host's places (or read while all the process's places were taken), stays
-- due as it is. Either way its request is kept until it is due and ARGV[4] more (the longer of a lease and
-- the session's TTL), as a claim keeps it (callback_claim.lua): a backlog that outlasts the session's TTL
-- drops no callback. Only a queued callback is touched: a settled one is not queued again, and one due later
-- (claimed since, or a retry) keeps its time (XX GT). The request's own expiry is recorded first, once
-- (`cbx`, as a claim does): the final outcome gives back what the callback scripts added.
-- KEYS[1] the bucket's due callbacks sg:{s:<bucket>}:cb   KEYS[2] the request hash sg:{s:<bucket>}:r:<rid>
-- ARGV[1] request id   ARGV[2] when it is due again (ms; 0: as it is)   ARGV[3] now (ms)
-- ARGV[4] ms to keep the request past its due time
-- Returns 1 | 0 when it is not queued.
redis.call('ZADD', KEYS[1], 'XX', 'GT', ARGV[2], ARGV[1])
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due then return 0 end
local keep = math.max(tonumber(due) - tonumber(ARGV[3]), 0) + tonumber(ARGV[4])
if redis.call('HEXISTS', KEYS[2], 'cbx') == 0 then  -- its own expiry, before any callback script lengthens it
  local own = redis.call('PEXPIRETIME', KEYS[2])
  if own > 0 then redis.call('HSET', KEYS[2], 'cbx', own) end  -- a key without a TTL: nothing to give back
end
redis.call('PEXPIRE', KEYS[2], keep, 'GT')  -- only longer: a key without a TTL is left so
return 1
