-- outbox_done.lua (data plane, cluster): the repair pass's answer for the heads outbox.lua gave it. Those
-- the control plane knows leave the outbox; those whose control master refused or could not be reached
-- go to its back (scored now, the age counting again), so that the next pass's batch of the oldest
-- entries reaches the heads behind them: else a group whose master refuses, with a batch's worth of
-- heads in a bucket, would hold back every other group's there for as long as it refused. Only an entry
-- still there is moved (a start removed it meanwhile), and never to an earlier score.
-- KEYS[1] a bucket's data prefix sg:{s:<bucket>}:
-- ARGV[1] flags   ARGV[2] n, the number of known heads   ARGV[3..n+2] their request ids   ARGV[n+3..] the
-- request ids of the refused ones
-- Returns the number removed.
local box = KEYS[1] .. 'ob'
local known = tonumber(ARGV[2])
local removed = 0
if known > 0 then removed = redis.call('ZREM', box, unpack(ARGV, 3, known + 2)) end
if #ARGV > known + 2 then
  local now, later = clock(), { 'XX', 'GT' }
  for i = known + 3, #ARGV do
    later[#later + 1] = now
    later[#later + 1] = ARGV[i]
  end
  redis.call('ZADD', box, unpack(later))
end
return removed
