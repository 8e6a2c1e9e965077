-- read_log.lua (data plane, read only): the events of a session after an exclusive cursor, oldest first.
-- KEYS[1] the session's data prefix sg:{s:<bucket>}:
-- ARGV[1] flags   ARGV[2] session id   ARGV[3] cursor (last event id seen; 0 = from the oldest kept)
-- ARGV[4] max entries
-- Returns {last id assigned (0 = no session), id of the oldest kept event (older ones were trimmed,
-- --session-log-max-events: a cursor before it - 1 has a gap), entries...}.
local meta = kmeta(KEYS[1], ARGV[2])
local seq = tonumber(redis.call('HGET', meta, 'seq') or '0')
local base = tonumber(redis.call('HGET', meta, 'base') or '1')
local start = math.max(tonumber(ARGV[3]) + 1 - base, 0)
local entries = redis.call('LRANGE', klog(KEYS[1], ARGV[2]), start, start + tonumber(ARGV[4]) - 1)
table.insert(entries, 1, base)
table.insert(entries, 1, seq)
return entries
