-- sweep.lua (control plane): the clock-driven part of one group's scheduling, run by every
-- scheduler process: close the runs whose worker lease lapsed (retiring that worker), promote
-- requests waiting past their class's max wait while a higher class has work (aging), and dispatch
-- when the group's quota now admits work. Idempotent; safe to run anywhere.
-- On one server a lost run is handed back in this call; on a cluster its "rid|attempt" is returned
-- and the scheduler hands it back on the data plane, then releases it here (release.lua). Its lease
-- stays until that release, so a scheduler that dies in between leaves it for the next sweep.
-- KEYS[1] the group's control prefix sg:{g:<group>}:
-- ARGV[1] flags   ARGV[2] lease ms   ARGV[3] max attempts (a lost worker counts as a failed attempt)
-- ARGV[4] session ttl s
-- Returns {lapsed runs, promoted, dispatched, next wake ms or -1, now ms, "rid|attempt" to hand back...}.
local cp, lease, max_attempts, ttl = KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now = clock()
local lapsed, promoted = 0, 0
local lost = {}
for _, key in ipairs(redis.call('ZRANGEBYSCORE', cp .. 'leases', '-inf', now, 'LIMIT', 0, 200)) do
  local rec = run_record(cp, key)
  if not rec then
    redis.call('ZREM', cp .. 'leases', key)
  else
    -- A lapsed lease means its worker stopped heartbeating. The same heartbeat set the worker's
    -- liveness key, which can outlive the lease by a moment (key expiry runs on the server's own
    -- clock, frozen while a script runs): retire the worker now, or the requeued run could go
    -- straight back to it through one of its idle tickets. A worker that was only paused finds
    -- out at its next heartbeat (rejoin) and offers its free slots again.
    redis.call('DEL', kworker(cp, rec.w))
    redis.call('LREM', cp .. 'idle', 0, rec.w)
    lapsed = lapsed + 1
    if single_server then
      local _, _, produced, spec, nxt = d_stop(rec.rid, tostring(rec.a), nil, 'worker_lost', max_attempts, now,
        ttl, false)
      release(cp, key, produced, spec, now)
      if nxt then ready(gpre(nxt.g), nxt, now, lease) end
    else
      lost[#lost + 1] = key
    end
  end
end
local pol = policy(cp)
-- Aging bounds the wait that higher classes impose: only classes below the highest class with
-- ready work are promoted. The highest class is served by fair share, which starves no tenant;
-- promoting it too would let the longest-waiting (lowest-weight) tenants jump the fair order.
local highest = tonumber(redis.call('ZREVRANGEBYSCORE', cp .. 'cls', 9, '-inf', 'LIMIT', 0, 1)[1] or -1)
for cls = 0, highest - 1 do
  local limit = now - pol['mw' .. cls] * 1000
  for _, sid in ipairs(redis.call('ZRANGEBYSCORE', cp .. 'age' .. cls, '-inf', limit, 'LIMIT', 0, 100)) do
    local spec = ready_head(cp, sid)
    if spec and remove_ready(cp, sid, spec.tn, cls) then
      spec.ep = 10
      make_ready(cp, spec, now, true)
      if single_server then redis.call('HSET', kreq(spec.rid), 'ep', 10) end
      promoted = promoted + 1
    else
      redis.call('ZREM', cp .. 'age' .. cls, sid)
    end
  end
end
redis.call('HDEL', cp .. 'qs', 'wake')
local started = dispatch(cp, now, lease)
local nxt = redis.call('HGET', cp .. 'qs', 'wake')
local reply = { lapsed, promoted, started, nxt or '-1', tostring(now) }
for _, key in ipairs(lost) do reply[#reply + 1] = key end
return reply
