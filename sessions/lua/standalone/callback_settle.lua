-- callback_settle.lua (run with EVAL by the delivery process): record how a claimed delivery attempt
-- went, in the request (`cbs` status, `cbe` last error: GET /v1/requests/{id} shows them as `callback`).
-- Ignored when another attempt was claimed since (this one's lease ran out).
-- KEYS[1] the bucket's due callbacks sg:{s:<bucket>}:cb   KEYS[2] the request hash sg:{s:<bucket>}:r:<rid>
-- ARGV[1] request id   ARGV[2] attempt number   ARGV[3] "delivered" | "retry" | "failed"
-- ARGV[4] error ("" = none)   ARGV[5] when to retry (ms; "retry" only)
-- Returns 1 | 0 when ignored.
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
if tonumber(redis.call('HGET', KEYS[2], 'cbn') or '0') ~= tonumber(ARGV[2]) then return 0 end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], 'cbe', ARGV[4]) end
if ARGV[3] == 'retry' then
  redis.call('ZADD', KEYS[1], tonumber(ARGV[5]), ARGV[1])
  return 1
end
redis.call('HSET', KEYS[2], 'cbs', ARGV[3])
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
