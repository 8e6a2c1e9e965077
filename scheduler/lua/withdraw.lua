-- withdraw.lua (control plane, cluster): after cancel.lua, take the cancelled request out of its
-- group: out of the ready set, or its run stopped (the worker is told at once), and out of dlq (a `fail`
-- deadline noted while it waited behind its session's head, which would stay up to that deadline after the
-- session is gone: only readying it or the sweep at its deadline took it out). Also after expire.lua, whose
-- sweep took that entry out already.
-- KEYS[1] the group's control prefix sg:{g:<group>}:
-- ARGV[1] flags   ARGV[2] lease ms   ARGV[3] request id   ARGV[4] its attempt   ARGV[5] session id
-- ARGV[6] produced (-1 unknown)
-- Returns 1.
local produced = tonumber(ARGV[6])
withdraw(KEYS[1], ARGV[3], ARGV[4], ARGV[5], produced >= 0 and produced or nil, clock(), tonumber(ARGV[2]))
redis.call('ZREM', KEYS[1] .. 'dlq', ARGV[3] .. '|' .. ARGV[5])
return 1
