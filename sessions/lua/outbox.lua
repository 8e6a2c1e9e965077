-- outbox.lua (data plane, cluster): the repair pass's view of one bucket: heads made ready here
-- longer than ARGV[2] ms ago whose control step is not confirmed. Entries of requests that started
-- or ended meanwhile are dropped; the rest are returned with their ready spec, to be made ready
-- again (idempotent) and then confirmed with outbox_done.lua.
-- KEYS[1] a bucket's data prefix sg:{s:<bucket>}:
-- ARGV[1] flags   ARGV[2] age ms   ARGV[3] max entries
-- Returns {ready spec JSON...}.
local box = KEYS[1] .. 'ob'
local out = {}
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', box, '-inf', clock() - tonumber(ARGV[2]), 'LIMIT', 0,
  tonumber(ARGV[3]))) do
  local spec = ready_spec(rid)
  local st = redis.call('HGET', kreq(rid), 'st')
  if spec and (st == 'queued' or st == 'preempted') then
    out[#out + 1] = cjson.encode(spec)
  else
    redis.call('ZREM', box, rid)
  end
end
return out
