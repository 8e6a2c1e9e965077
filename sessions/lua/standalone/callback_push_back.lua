-- callback_push_back.lua (run with EVAL by the delivery process, webhooks/delivery.py: a pipeline of them
-- a pass): a due callback that waits for its receiver host (full or slow) is due again later, or, held
-- by the process for one of the host's places (or read while all the process's places were taken), stays
-- due as it is. Either way its request is kept until it is due and ARGV[4] more (the longer of a lease and
-- the session's TTL), as a claim keeps it (callback_claim.lua): a backlog that outlasts the session's TTL
-- drops no callback. Only a queued callback is touched: a settled one is not queued again, and one due later
-- (claimed since, or a retry) keeps its time (XX GT). The request's own expiry is recorded first, once
-- (`cbx`, as a claim does): the final outcome gives back what the callback scripts added.
-- A wait for a slow host is bounded (ARGV[5] > 0: pushed back because its host is slow): the first such
-- push notes when (`cbw`, kept until an attempt claims it: callback_claim.lua clears it, so each wait is
-- counted on its own); a callback still due (unclaimed) that has waited so more than ARGV[5] ms, its whole
-- retry schedule, is settled failed here without an attempt (`cbe` ARGV[6]), as callback_settle.lua
-- settles a last attempt (its request kept ARGV[7] ms more, or until its own expiry); one pushed back is due
-- again no later than just past that bound, when a pass gives it up. Any other wait (a fast host's, held, a
-- full process's, a delivery outage) is never bounded here, and notes nothing.
-- KEYS[1] the bucket's due callbacks sg:{s:<bucket>}:cb   KEYS[2] the request hash sg:{s:<bucket>}:r:<rid>
-- ARGV[1] request id   ARGV[2] when it is due again (ms; 0: as it is)   ARGV[3] now (ms)
-- ARGV[4] ms to keep the request past its due time
-- ARGV[5] ms past its first push back for its host's slowness (`cbw`) after which a callback pushed back so
-- is failed (0: not pushed back for slowness: never, and `cbw` is neither noted nor read)
-- ARGV[6] that failure's error   ARGV[7] ms to keep the request of a callback failed so
-- Returns 1 | 0 when it is not queued | 2 when it was failed (waited past its schedule).
local now = tonumber(ARGV[3])
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due then return 0 end
local again = tonumber(ARGV[2])
local bound = tonumber(ARGV[5])
local since = bound > 0 and redis.call('HGET', KEYS[2], 'cbw')
since = since and tonumber(since)
if bound > 0 and not since and redis.call('EXISTS', KEYS[2]) == 1 then  -- its first wait for its
  since = now  -- host's slowness (since its last claim) begins (an expired request's hash is not made again)
  redis.call('HSET', KEYS[2], 'cbw', now)
end
if since then
  local last = since + bound
  if tonumber(due) <= now and now > last then  -- unclaimed, and past its schedule: failed, not sent
    redis.call('HSET', KEYS[2], 'cbs', 'failed', 'cbe', ARGV[6])
    redis.call('HDEL', KEYS[2], 'cbw')
    redis.call('ZREM', KEYS[1], ARGV[1])
    local own = tonumber(redis.call('HGET', KEYS[2], 'cbx'))
    if own then  -- give back what the callback scripts added (as callback_settle.lua does)
      redis.call('PEXPIREAT', KEYS[2], math.max(own, now + tonumber(ARGV[7])))
      redis.call('HDEL', KEYS[2], 'cbx')
    else  -- none recorded (never lengthened, or no TTL): only longer, a key without a TTL is left so
      redis.call('PEXPIRE', KEYS[2], ARGV[7], 'GT')
    end
    return 2
  end
  if again > last then again = math.floor(last) + 1 end  -- no wait past its schedule: given up then
end
if again > 0 then
  redis.call('ZADD', KEYS[1], 'XX', 'GT', again, ARGV[1])
  due = redis.call('ZSCORE', KEYS[1], ARGV[1])
end
local keep = math.max(tonumber(due) - now, 0) + tonumber(ARGV[4])
if redis.call('HEXISTS', KEYS[2], 'cbx') == 0 then  -- its own expiry, before any callback script lengthens it
  local own = redis.call('PEXPIRETIME', KEYS[2])
  if own > 0 then redis.call('HSET', KEYS[2], 'cbx', own) end  -- a key without a TTL: nothing to give back
end
redis.call('PEXPIRE', KEYS[2], keep, 'GT')  -- only longer: a key without a TTL is left so
return 1
