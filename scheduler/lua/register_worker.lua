-- register_worker.lua (control plane): a worker comes up, re-offers its free slots after a lapse, or
-- leaves: set its liveness key and put one ticket per free slot into its group's idle list, then
-- dispatch into them. Every earlier ticket of the worker is withdrawn first, so calling it again
-- never doubles a slot.
-- KEYS[1] the group's control prefix sg:{g:<group>}:
-- ARGV[1] flags   ARGV[2] the worker's own lease ms (its liveness; kept in wl while it is registered: its
-- runs' first lease and the sweep's lost-worker test go by it, runs.lua worker_lease)   ARGV[3] worker id
-- ARGV[4] free slots
-- ARGV[5] total slots (0 = deregister)   ARGV[6] what the worker shows operators (JSON), with its slots
-- and the inbox format it reads (`inbox`, read by start_run; shown in the admin listing too)
-- ARGV[7..] "rid|attempt" of the runs it holds (optional), counted out of ARGV[4] (its slots minus
-- these; it may be negative: a worker can hold one run more than its slots for a moment, see below)
-- An assignment still waiting in the worker's inbox holds a ticket already: it is not offered again.
-- A held run or waiting assignment that holds no ticket (its slot was handed over to another run by
-- a preemption, or its ticket died with the worker when it was reaped) takes no slot from
-- the offer: its end gives none back. A ticket of the worker's that is neither held nor waiting is
-- dropped (lost with an inbox read's reply).
-- Returns {the number of requests dispatched, the excess: runs and waiting assignments holding a ticket
-- past the worker's slots}.
local cp, lease, wid, free, total = KEYS[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local roster = cp .. 'wk'
redis.call('LREM', cp .. 'idle', 0, wid)
if total == 0 then
  -- leaving: whatever its inbox still holds is handed back by the worker right after this; the list
  -- expires in case it cannot (its assignments' leases lapse and the sweep requeues them)
  redis.call('PEXPIRE', kworker(cp, wid) .. ':in', math.floor(lease * 10))
  redis.call('DEL', kworker(cp, wid))
  redis.call('HDEL', cp .. 'workers', wid)
  redis.call('HDEL', cp .. 'wl', wid)
  redis.call('ZREM', roster, wid)
  return { 0, 0 }
end
local now = clock()
redis.call('PERSIST', kworker(cp, wid) .. ':in')
redis.call('SET', kworker(cp, wid), now, 'PX', math.floor(lease))
redis.call('ZADD', roster, now, wid)
redis.call('HSET', cp .. 'workers', wid, ARGV[6])
redis.call('HSET', cp .. 'wl', wid, math.floor(lease))
local known = {} -- the attempts this worker holds or will read from its inbox
for i = 7, #ARGV do
  known[ARGV[i]] = true
  if redis.call('HEXISTS', cp .. 'tk', ARGV[i]) == 0 then free = free + 1 end
end
for _, entry in ipairs(redis.call('LRANGE', kworker(cp, wid) .. ':in', 0, -1)) do
  -- the entry's key, "rid|attempt", before any "|reason" or newline and run spec
  local key = string.match(entry, '^[^|\n]*|?[^|\n]*')
  known[key] = true
  if redis.call('HEXISTS', cp .. 'tk', key) == 1 then free = free - 1 end
end
-- A ticket held for this worker by an attempt it neither holds nor will read was lost on the way:
-- popped by an inbox read whose reply never arrived, or held by an earlier process under the same id.
-- It no longer stands for a slot (the offer counts every slot the worker does not use), so it goes:
-- the group's slot count (headroom) stays exact, and the attempt's lease lapses and requeues it.
local held = redis.call('HGETALL', cp .. 'tk')
for i = 1, #held, 2 do
  if held[i + 1] == wid and not known[held[i]] then redis.call('HDEL', cp .. 'tk', held[i]) end
end
for _ = 1, math.min(total, free) do redis.call('LPUSH', cp .. 'idle', wid) end
-- what holds a ticket past the slots (they shrank under held runs and waiting assignments): the worker's
-- next ends of as many runs give none back
return { dispatch(cp, now, lease), math.max(0, -free) }
