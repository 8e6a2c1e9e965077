-- usage_apply.lua (run with EVAL by sessions/usage.py): add one bucket's folded usage of one hour to
-- that hour's fleet-wide hash, once: the hash notes the last fold it applied per bucket ("@<bucket>").
-- KEYS[1] sg:usage:<hour>
-- ARGV[1] bucket   ARGV[2] fold sequence   ARGV[3] TTL (s)   ARGV[4..] field, count, field, count, ...
-- Returns 1 | 0 when this fold was applied already.
local mark = '@' .. ARGV[1]
if tonumber(redis.call('HGET', KEYS[1], mark) or '0') >= tonumber(ARGV[2]) then return 0 end
-- A count the hour cannot take (not an integer, or its total past 2^63) is skipped, not raised: raised,
-- it would fail this fold, taken again with it, for ever, and with it every usage read (which folds first).
for i = 4, #ARGV, 2 do redis.pcall('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], mark, ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
