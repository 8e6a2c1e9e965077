-- note_behind.lua (control plane, cluster): a request with a "fail" deadline that waits behind its session's
-- head, noted in its group's dlq (submit_one.lua does it on one server), where the sweep ends it if it still
-- waits by then; and the group's loop woken for that deadline should it sleep past it (fairness.lua
-- note_deadline_wake), as readying a head with one wakes it.
-- KEYS[1] the group's control prefix sg:{g:<group>}:
-- ARGV[1] flags   ARGV[2] "rid|sid"   ARGV[3] its deadline (ms)
redis.call('ZADD', KEYS[1] .. 'dlq', ARGV[3], ARGV[2])
note_deadline_wake(KEYS[1], tonumber(ARGV[3]))
return 1
