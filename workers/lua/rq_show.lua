-- rq_show.lua (rq's server, standalone): show runs in rq's registries as rq itself writes a started
-- job (rq 3.x: Job.save, Execution.create, Execution.heartbeat, Execution.delete), in one call: one
-- command for a change's records instead of fourteen a run through redis-py (workers/presence.py).
-- Idempotent: a call resent after a lost reply writes the same records (the ids are the caller's).
-- KEYS[1] the queue's StartedJobRegistry (rq:wip:<queue>)
-- KEYS[2] the worker's execution index (rq:worker:<name>:executions)
-- then, per run (the ended ones, then the started ones, then the renewed ones), three keys:
--   its Job hash (rq:job:<job id>), its Execution hash (rq:execution:<job id>:<execution id>) and
--   the job's ExecutionRegistry (rq:executions:<job id>)
-- ARGV[1] ended count   ARGV[2] started count   ARGV[3] renewed count
-- ARGV[4] the Job hash's TTL (s)   ARGV[5] the execution records' TTL (s)
-- ARGV[6] now, unix seconds (float: the Execution's timestamps)   ARGV[7] now, whole unix seconds (scores)
-- ARGV[8] the worker's name   ARGV[9] F: how many Job fields are the same for every run
-- ARGV[10 .. 9 + 2F] those F field/value pairs
-- then per ended run 2 values: job id, execution id
-- then per started run 6 values: job id, execution id, description, meta, created_at, started_at (ISO)
-- then per renewed run 2 values: job id, execution id
-- Returns the number of runs written.
local ended, started, renewed = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local job_ttl, execution_ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local now, whole_now, worker = ARGV[6], tonumber(ARGV[7]), ARGV[8]
local fields = tonumber(ARGV[9])
local template = {}
for i = 10, 9 + 2 * fields do template[#template + 1] = ARGV[i] end
local a = 10 + 2 * fields  -- the next run's first value
local k = 3  -- the next run's first key
local wip_score = whole_now + execution_ttl  -- StartedJobRegistry.add_execution: now + ttl
local registry_score = whole_now + execution_ttl + 60  -- ExecutionRegistry.add: now + ttl, plus 60

for _ = 1, ended do
  local job_id, execution_id = ARGV[a], ARGV[a + 1]
  local composite = job_id .. ':' .. execution_id
  redis.call('DEL', KEYS[k + 1])
  redis.call('ZREM', KEYS[1], composite)
  redis.call('ZREM', KEYS[k + 2], execution_id)
  redis.call('SREM', KEYS[2], composite)
  redis.call('DEL', KEYS[k])
  a, k = a + 2, k + 3
end
for _ = 1, started do
  local job_id, execution_id = ARGV[a], ARGV[a + 1]
  local composite = job_id .. ':' .. execution_id
  redis.call('HSET', KEYS[k], 'description', ARGV[a + 2], 'meta', ARGV[a + 3], 'created_at', ARGV[a + 4],
    'started_at', ARGV[a + 5], unpack(template))
  redis.call('EXPIRE', KEYS[k], job_ttl)
  redis.call('HSET', KEYS[k + 1], 'id', execution_id, 'job_id', job_id, 'created_at', now,
    'last_heartbeat', now, 'worker_name', worker)
  redis.call('EXPIRE', KEYS[k + 1], execution_ttl)
  redis.call('ZADD', KEYS[k + 2], registry_score, execution_id)
  redis.call('EXPIRE', KEYS[k + 2], execution_ttl + 60)
  redis.call('ZADD', KEYS[1], wip_score, composite)
  redis.call('SADD', KEYS[2], composite)
  redis.call('EXPIRE', KEYS[2], execution_ttl + 60)
  a, k = a + 6, k + 3
end
for _ = 1, renewed do
  local job_id, execution_id = ARGV[a], ARGV[a + 1]
  redis.call('EXPIRE', KEYS[k], job_ttl)
  -- whole, not one field: after a beat late enough that it expired, a partial hash would break rq's reader
  redis.call('HSETNX', KEYS[k + 1], 'created_at', now)
  redis.call('HSET', KEYS[k + 1], 'id', execution_id, 'job_id', job_id, 'last_heartbeat', now, 'worker_name', worker)
  redis.call('EXPIRE', KEYS[k + 1], execution_ttl)
  redis.call('ZADD', KEYS[1], 'XX', wip_score, job_id .. ':' .. execution_id)
  redis.call('ZADD', KEYS[k + 2], 'XX', registry_score, execution_id)
  redis.call('EXPIRE', KEYS[k + 2], execution_ttl + 60)
  a, k = a + 2, k + 3
end
return ended + started + renewed
