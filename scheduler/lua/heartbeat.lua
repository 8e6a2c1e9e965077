-- heartbeat.lua (control plane): renew a worker's liveness and the leases of the runs it still owns,
-- and reap the workers of its group that stopped heartbeating without deregistering (kill -9, lost
-- host): their slot tickets and their inbox go, so the group's free-slot ledger stays exact. A run a deadline
-- boost started at a raised class ranks at its own class from here once its first token came (read from
-- its request's hash on one server, which then has its ep written too) or its deadline passed (runs.lua
-- unboost_run).
-- KEYS[1] the group's control prefix sg:{g:<group>}:
-- ARGV[1] flags   ARGV[2] the worker's own lease ms (a live beat records it in wl: runs.lua worker_lease)
-- ARGV[3] worker id   ARGV[4] "live" | "leaving" (renew run leases
-- only: shutting down, or the next chunk of a worker's runs, sessions/transitions.py)   ARGV[5..]
-- "rid|attempt" of each run it holds
-- Returns {rejoin, lost...}: rejoin is 1 when a live worker had lapsed, been retired by the sweep or
-- been reaped (its tickets may be gone: it must re-offer its free slots); lost lists the
-- "rid|attempt" runs it no longer owns (it should stop them), and as "rid|attempt|reason" the runs
-- the control plane stopped (preempted or cancelled on a cluster, where its hand-back is what fences
-- them): their leases are still renewed, but a notice the worker missed is not missed for long. The liveness key of a lapsed worker is
-- not set again here but by register_worker, with its tickets: until then every heartbeat answers
-- rejoin, so a reply lost on the way (or a replayed call) cannot make the worker miss it.
local cp, lease, wid, mode = KEYS[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local now = clock()
local rejoin = 0
if mode == 'live' then
  local roster = cp .. 'wk'
  if redis.call('EXISTS', kworker(cp, wid)) == 0 or not redis.call('ZSCORE', roster, wid) then
    rejoin = 1
  else
    redis.call('SET', kworker(cp, wid), now, 'PX', math.floor(lease))
  end
  redis.call('ZADD', roster, now, wid) -- heard from: not reaped while it rejoins
  redis.call('HSET', cp .. 'wl', wid, math.floor(lease)) -- kept up to date (a worker registered by an older version)
  for _, dead in ipairs(redis.call('ZRANGEBYSCORE', roster, '-inf', now - lease, 'LIMIT', 0, 16)) do
    if redis.call('EXISTS', kworker(cp, dead)) == 0 then
      redis.call('LREM', cp .. 'idle', 0, dead)
      redis.call('DEL', kworker(cp, dead) .. ':in') -- its assignments' leases lapse: the sweep requeues them
      redis.call('HDEL', cp .. 'workers', dead)
      redis.call('HDEL', cp .. 'wl', dead)
      redis.call('ZREM', roster, dead)
      -- the slots its unreleased attempts held die with it (a worker that was only retired keeps
      -- them: it offers the rest when it rejoins, and these come back when it lets go of the runs)
      local held = redis.call('HGETALL', cp .. 'tk')
      for i = 1, #held, 2 do
        if held[i + 1] == dead then redis.call('HDEL', cp .. 'tk', held[i]) end
      end
    end
  end
end
local reply = { rejoin }
for i = 5, #ARGV do
  local rec = run_record(cp, ARGV[i])
  if rec and rec.w == wid then
    redis.call('ZADD', cp .. 'leases', 'XX', now + lease, ARGV[i])
    redis.call('ZADD', cp .. 'pre', 'XX', now + lease, ARGV[i])
    if rec.bo then unboost_run(cp, ARGV[i], rec, now) end
    if rec.cx then
      reply[#reply + 1] = ARGV[i] .. '|cancelled'
    elseif rec.rq then
      reply[#reply + 1] = ARGV[i] .. '|' .. (rec.rr or 'priority')
    end
  else
    reply[#reply + 1] = ARGV[i]
  end
end
return reply
