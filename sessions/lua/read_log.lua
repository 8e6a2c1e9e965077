-- read_log.lua (data plane, read only): the events of a session after an exclusive cursor, oldest first.
-- KEYS[1] the session's data prefix sg:{s:<bucket>}:
-- ARGV[1] flags   ARGV[2] session id   ARGV[3] cursor (last event id seen; 0 = from the oldest kept)
-- ARGV[4] max entries
-- Returns {last id assigned (0 = no session), id of the oldest kept event (older ones were trimmed,
-- --session-log-max-events: a cursor before it - 1 has a gap), the id holes left by restarts
-- ("hs:he,...", "" for none: log_ids.lua), the session's owner (its tenant; "" for none: a stream
-- opened for one tenant ends when the id was recycled for another), entries...}.
local meta = kmeta(KEYS[1], ARGV[2])
local fields = redis.call('HMGET', meta, 'seq', 'base', 'hl', 'tn')
local seq, base = tonumber(fields[1] or '0'), tonumber(fields[2] or '1')
local start = offset_after(math.max(tonumber(ARGV[3]), base - 1), base, parse_holes(fields[3]))
local entries = redis.call('LRANGE', klog(KEYS[1], ARGV[2]), start, start + tonumber(ARGV[4]) - 1)
table.insert(entries, 1, fields[4] or '')
table.insert(entries, 1, fields[3] or '')
table.insert(entries, 1, base)
table.insert(entries, 1, seq)
return entries
