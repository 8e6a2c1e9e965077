-- register_worker.lua: a worker comes up (or leaves, with 0 slots): set its liveness key and put
-- one ticket per free slot into its group's idle list, then dispatch into those slots.
-- KEYS[1] worker liveness key sg:w:<wid>   KEYS[2] group idle list sg:g:<G>:idle
-- ARGV[1] lease ms   ARGV[2] worker id   ARGV[3] group   ARGV[4] free slots (0 = deregister)
-- Returns the number of requests dispatched.
local lease, wid, group, slots = tonumber(ARGV[1]), ARGV[2], ARGV[3], tonumber(ARGV[4])
redis.call('LREM', KEYS[2], 0, wid)
if slots == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('HDEL', PREFIX .. 'workers', wid)
  return 0
end
local now = clock()
redis.call('SET', KEYS[1], now, 'PX', math.floor(lease))
redis.call('SADD', PREFIX .. 'groups', group)
redis.call('HSET', PREFIX .. 'workers', wid, group .. '|' .. slots)
for _ = 1, slots do redis.call('LPUSH', KEYS[2], wid) end
return dispatch(group, now, lease)
