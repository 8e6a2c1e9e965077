-- usage_take.lua (run with EVAL by sessions/usage.py): take a bucket's pending usage for folding into
-- the hourly hashes. Folding is three steps in different slots (take here, apply to each hour, drop
-- here), each safe to repeat: a fold that died half-way is taken again, with the same sequence, and
-- the hours that applied it already skip it (usage_apply.lua).
-- KEYS[1] pending usage sg:{s:<bucket>}:u   KEYS[2] usage being folded sg:{s:<bucket>}:uf
-- Returns false (nothing to fold) | the folded hash's fields and values, its sequence under "#".
if redis.call('EXISTS', KEYS[2]) == 0 then
  if redis.call('EXISTS', KEYS[1]) == 0 then return false end
  redis.call('RENAME', KEYS[1], KEYS[2])
  -- The sequence: the server's clock in microseconds, increasing from one fold of a bucket to the next.
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[2], '#', string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2])))
end
return redis.call('HGETALL', KEYS[2])
