-- heartbeat.lua: renew a worker's liveness and the leases of the requests it still owns, and reap
-- the workers of its group that stopped heartbeating without deregistering (kill -9, lost host):
-- their slot tickets and their inbox go, so the group's free-slot ledger stays exact.
-- KEYS[1] worker liveness key sg:w:<wid>
-- ARGV[1] lease ms   ARGV[2] worker id   ARGV[3] group   ARGV[4] "live" | "leaving" (shutting down:
-- renew run leases only)   ARGV[5..] "rid|attempt" of each request it runs
-- Returns {rejoin, lost...}: rejoin is 1 when a live worker had lapsed, been retired by the sweep or
-- been reaped (its tickets may be gone: it must re-offer its free slots); lost lists the
-- "rid|attempt" runs it no longer owns (it should stop them). The liveness key of a lapsed worker is
-- not set again here but by register_worker, with its tickets: until then every heartbeat answers
-- rejoin, so a reply lost on the way (or a replayed call) cannot make the worker miss it.
local lease, wid, group, mode = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local now = clock()
local rejoin = 0
if mode == 'live' then
  local roster = kg(group, 'wk')
  if redis.call('EXISTS', KEYS[1]) == 0 or not redis.call('ZSCORE', roster, wid) then
    rejoin = 1
  else
    redis.call('SET', KEYS[1], now, 'PX', math.floor(lease))
  end
  redis.call('ZADD', roster, now, wid) -- heard from: not reaped while it rejoins
  for _, dead in ipairs(redis.call('ZRANGEBYSCORE', roster, '-inf', now - lease, 'LIMIT', 0, 16)) do
    if redis.call('EXISTS', kworker(dead)) == 0 then
      redis.call('LREM', kg(group, 'idle'), 0, dead)
      redis.call('DEL', kworker(dead) .. ':in') -- its assignments' leases lapse: the sweep requeues them
      redis.call('HDEL', PREFIX .. 'workers', dead)
      redis.call('ZREM', roster, dead)
    end
  end
end
local reply = { rejoin }
for i = 5, #ARGV do
  local rid, attempt = string.match(ARGV[i], '^(.*)|(%d+)$')
  local r = load(rid, { 'st', 'a', 'w' })
  if owns(r, attempt, wid) then
    redis.call('ZADD', PREFIX .. 'leases', 'XX', now + lease, rid)
  else
    reply[#reply + 1] = ARGV[i]
  end
end
return reply
