-- submit_one.lua (one server): submit.lua and ready.lua in one call, so that a first token pays for
-- one round trip, not two. Both planes' keys live on the one server.
-- KEYS[1] the session's data prefix sg:{s:<bucket>}:   KEYS[2] the group's control prefix sg:{g:<group>}:
-- ARGV[1] flags   ARGV[2] lease ms   ARGV[3..17] as submit.lua's ARGV[2..16]
-- Returns {"ok", seq of the queued event} | {"forbidden", owner}. A request with a "fail" deadline that
-- waits behind its session's head goes into the group's dlq, where the sweep ends it if still waiting (its
-- loop woken for it).
local now = clock()
local outcome, seq, spec, behind = d_submit(KEYS[1], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9],
  ARGV[10], ARGV[11], ARGV[12], ARGV[13], now, false, ARGV[14], ARGV[15], ARGV[16], ARGV[17])
if behind then -- its loop woken should it sleep past the deadline (fairness.lua note_deadline_wake)
  redis.call('ZADD', KEYS[2] .. 'dlq', behind, ARGV[3] .. '|' .. ARGV[4])
  note_deadline_wake(KEYS[2], tonumber(behind))
end
-- d_submit leaves a head to be counted waiting here, where it may start at once (then it is not). A ready
-- that fails leaves it stored and waiting (nothing rolls back): counted, then the error reaches the caller.
if spec then
  local readied, answer = pcall(ready, KEYS[2], spec, now, tonumber(ARGV[2]), true)
  count_if_not_started(spec)
  if not readied then error(answer, 0) end
end
return { outcome, seq }
