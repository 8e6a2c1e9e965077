-- sweep.lua: the clock-driven part of scheduling, run by every scheduler process: requeue the
-- requests whose worker lease expired (retiring that worker), promote requests waiting past their
-- class's max wait while a higher class has work (aging), and dispatch the groups whose quota now
-- admits work. Idempotent; safe to run anywhere.
-- KEYS[1] sg:leases   KEYS[2] sg:wake   KEYS[3] sg:groups
-- ARGV[1] lease ms
-- Returns {requeued, promoted, dispatched, next wake ms or -1, now ms}.
local lease = tonumber(ARGV[1])
local now = clock()
local requeued, promoted, started = 0, 0, 0
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 200)) do
  local r = load(rid, RUN_FIELDS)
  if r.st == 'running' then
    -- A lapsed lease means its worker stopped heartbeating. The same heartbeat set the worker's
    -- liveness key, which can outlive the lease by a moment (key expiry runs on the server's own
    -- clock, frozen while a script runs): retire the worker now, or the requeued run could go
    -- straight back to it through one of its idle tickets. A worker that was only paused finds
    -- out at its next heartbeat (rejoin) and offers its free slots again.
    if r.w then
      redis.call('DEL', kworker(r.w))
      redis.call('LREM', kg(r.g, 'idle'), 0, r.w)
    end
    requeue(rid, r, now, 'worker_lost', false, lease)
    requeued = requeued + 1
  else
    redis.call('ZREM', KEYS[1], rid)
  end
end
local pol = policy()
for _, group in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  -- Aging bounds the wait that higher classes impose: only classes below the highest class with
  -- ready work are promoted. The highest class is served by fair share, which starves no tenant;
  -- promoting it too would let the longest-waiting (lowest-weight) tenants jump the fair order.
  local highest = tonumber(redis.call('ZREVRANGEBYSCORE', kg(group, 'cls'), 9, '-inf', 'LIMIT', 0, 1)[1] or -1)
  for cls = 0, highest - 1 do
    local limit = now - pol['mw' .. cls] * 1000
    for _, sid in ipairs(redis.call('ZRANGEBYSCORE', kg(group, 'age' .. cls), '-inf', limit, 'LIMIT', 0, 100)) do
      local rid = redis.call('LINDEX', kqueue(sid), 0)
      local tenant = rid and redis.call('HGET', kreq(rid), 'tn')
      if tenant and remove_ready(sid, group, tenant, cls) then
        redis.call('HSET', kreq(rid), 'ep', 10)
        make_ready(rid, now, true)
        promoted = promoted + 1
      else
        redis.call('ZREM', kg(group, 'age' .. cls), sid)
      end
    end
  end
  redis.call('ZREM', KEYS[2], group)
  started = started + dispatch(group, now, lease)
end
local nxt = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')[2]
return { requeued, promoted, started, nxt and tostring(nxt) or '-1', tostring(now) }
