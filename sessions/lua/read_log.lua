-- read_log.lua: the events of a session after an exclusive cursor, oldest first.
-- KEYS[1] session meta sg:s:<sid>:m   KEYS[2] session log sg:s:<sid>:l
-- ARGV[1] cursor (last event id seen; 0 = from the oldest kept)   ARGV[2] max entries
-- Returns {last id assigned (0 = no session), entries...}.
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local base = tonumber(redis.call('HGET', KEYS[1], 'base') or '1')
local start = math.max(tonumber(ARGV[1]) + 1 - base, 0)
local entries = redis.call('LRANGE', KEYS[2], start, start + tonumber(ARGV[2]) - 1)
table.insert(entries, 1, seq)
return entries
