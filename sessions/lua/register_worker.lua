-- register_worker.lua: a worker comes up, re-offers its free slots after a lapse, or leaves: set its
-- liveness key and put one ticket per free slot into its group's idle list, then dispatch into them.
-- Every earlier ticket of the worker is withdrawn first, so calling it again never doubles a slot.
-- KEYS[1] worker liveness key sg:w:<wid>   KEYS[2] group idle list sg:g:<G>:idle
-- ARGV[1] lease ms   ARGV[2] worker id   ARGV[3] group   ARGV[4] free slots
-- ARGV[5] total slots (default ARGV[4]; 0 = deregister)
-- An assignment still waiting in the worker's inbox holds a ticket already: it is not offered again.
-- Returns the number of requests dispatched.
local lease, wid, group, free = tonumber(ARGV[1]), ARGV[2], ARGV[3], tonumber(ARGV[4])
local total = tonumber(ARGV[5] or ARGV[4])
local roster = kg(group, 'wk')
redis.call('LREM', KEYS[2], 0, wid)
if total == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('HDEL', PREFIX .. 'workers', wid)
  redis.call('ZREM', roster, wid)
  return 0
end
local now = clock()
redis.call('SET', KEYS[1], now, 'PX', math.floor(lease))
redis.call('ZADD', roster, now, wid)
redis.call('SADD', PREFIX .. 'groups', group)
redis.call('HSET', PREFIX .. 'workers', wid, group .. '|' .. total)
for _ = 1, free - redis.call('LLEN', KEYS[1] .. ':in') do redis.call('LPUSH', KEYS[2], wid) end
return dispatch(group, now, lease)
