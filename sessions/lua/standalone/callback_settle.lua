-- callback_settle.lua (run with EVAL by the delivery process): record how a claimed delivery attempt
-- went, in the request (`cbs` status, `cbe` last error: GET /v1/requests/{id} shows them as `callback`).
-- Ignored when another attempt was claimed since (this one's lease ran out), or when the callback ended
-- meanwhile (failed unsent, below: that left `cbn` as it was). A retry's request is kept for
-- at least ARGV[6] ms more, past its session's TTL if need be: until its retry is due and as long as a claim
-- keeps it past that (the callback's payload is the request hash). A final outcome's is kept ARGV[6] ms more
-- (long enough for it to be read), or until its own expiry when that is later: the one it had before the
-- callback scripts lengthened it (`cbx`, recorded by the first of them), set by the process that ended it.
-- What they kept it for is over, so its TTL may shorten, but never below its own.
-- "given_up" fails unsent a callback no attempt holds, whose receiver has been silent too long (webhooks/
-- delivery.py): as a last failed attempt ends it, its attempts (`cbn`) as they are; only one still queued and
-- due by ARGV[5] (one claimed since is due a lease on; one settled is no longer queued; a retry is due later).
-- KEYS[1] the bucket's due callbacks sg:{s:<bucket>}:cb   KEYS[2] the request hash sg:{s:<bucket>}:r:<rid>
-- ARGV[1] request id   ARGV[2] attempt number (given_up: unused)   ARGV[3] "delivered" | "retry" | "failed" |
-- "given_up"   ARGV[4] error ("" = none)   ARGV[5] when to retry (ms; "retry"), now (ms; "given_up")
-- ARGV[6] ms to keep the request
-- Returns 1 | 0 when ignored.
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
local outcome = ARGV[3]
if outcome == 'given_up' then
  local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if not due or tonumber(due) > tonumber(ARGV[5]) then return 0 end
  outcome = 'failed'
else
  local seen = redis.call('HMGET', KEYS[2], 'cbn', 'cbs')
  if tonumber(seen[1] or '0') ~= tonumber(ARGV[2]) then return 0 end
  -- Ended meanwhile without another claim (given up while this attempt's lease had lapsed): it stands.
  if seen[2] == 'failed' or seen[2] == 'delivered' then return 0 end
end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], 'cbe', ARGV[4]) end
if outcome == 'retry' then
  if redis.call('HEXISTS', KEYS[2], 'cbx') == 0 then  -- its own expiry, before any callback script lengthens it
    local own = redis.call('PEXPIRETIME', KEYS[2])
    if own > 0 then redis.call('HSET', KEYS[2], 'cbx', own) end  -- a key without a TTL: nothing to give back
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[6], 'GT')  -- only longer: a key without a TTL is left so
  redis.call('ZADD', KEYS[1], tonumber(ARGV[5]), ARGV[1])
  return 1
end
redis.call('HSET', KEYS[2], 'cbs', outcome)
redis.call('ZREM', KEYS[1], ARGV[1])
local own = tonumber(redis.call('HGET', KEYS[2], 'cbx'))
if own then  -- give back what the callback scripts added
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('PEXPIREAT', KEYS[2], math.max(own, now + tonumber(ARGV[6])))
  redis.call('HDEL', KEYS[2], 'cbx')
else  -- none recorded (never lengthened, or no TTL): only longer, a key without a TTL is left so
  redis.call('PEXPIRE', KEYS[2], ARGV[6], 'GT')
end
return 1
