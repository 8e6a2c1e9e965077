-- usage_take.lua (run with EVAL by sessions/usage.py): take a bucket's pending usage for folding into
-- the hourly hashes. Folding is three steps in different slots (take here, apply to each hour, drop
-- here), each safe to repeat: a fold that died half-way is taken again, with the same sequence, and
-- the hours that applied it already skip it (usage_apply.lua).
-- KEYS[1] pending usage sg:{s:<bucket>}:u   KEYS[2] usage being folded sg:{s:<bucket>}:uf
-- KEYS[3] the bucket's last fold sequence sg:{s:<bucket>}:us
-- ARGV[1] how long the last sequence is kept (s): as long as the hours that note it
-- Returns false (nothing to fold) | the folded hash's fields and values, its sequence under "#".
if redis.call('EXISTS', KEYS[2]) == 0 then
  if redis.call('EXISTS', KEYS[1]) == 0 then return false end
  redis.call('RENAME', KEYS[1], KEYS[2])
  -- The sequence: the server's clock in microseconds, but always past the bucket's last one. An hour
  -- skips a sequence at or below the last it applied, so one from a clock that stepped back (NTP, a
  -- failover to a host running behind) would drop the fold's counts.
  local t = redis.call('TIME')
  local seq = math.max(tonumber(t[1]) * 1000000 + tonumber(t[2]), tonumber(redis.call('GET', KEYS[3]) or '0') + 1)
  local text = string.format('%d', seq)
  redis.call('SET', KEYS[3], text, 'EX', tonumber(ARGV[1]))
  redis.call('HSET', KEYS[2], '#', text)
end
return redis.call('HGETALL', KEYS[2])
