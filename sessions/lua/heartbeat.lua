-- heartbeat.lua: renew a worker's liveness and the leases of the requests it still owns.
-- KEYS[1] worker liveness key sg:w:<wid>
-- ARGV[1] lease ms   ARGV[2] worker id   ARGV[3..] "rid|attempt" of each request it runs
-- Returns the "rid|attempt" entries the worker no longer owns (it should stop them).
local lease, wid = tonumber(ARGV[1]), ARGV[2]
local now = clock()
redis.call('SET', KEYS[1], now, 'PX', math.floor(lease))
local lost = {}
for i = 3, #ARGV do
  local rid, attempt = string.match(ARGV[i], '^(.*)|(%d+)$')
  local r = load(rid, { 'st', 'a', 'w' })
  if owns(r, attempt, wid) then
    redis.call('ZADD', PREFIX .. 'leases', 'XX', now + lease, rid)
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
