-- outbox_done.lua (data plane, cluster): the control plane knows these heads: drop them from the outbox.
-- KEYS[1] a bucket's data prefix sg:{s:<bucket>}:
-- ARGV[1] flags   ARGV[2..] request ids
-- Returns the number removed.
return redis.call('ZREM', KEYS[1] .. 'ob', unpack(ARGV, 2))
