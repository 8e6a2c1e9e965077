-- callback_silent.lua (run with EVAL by the delivery process, webhooks/delivery.py): an attempt to a receiver
-- (the callback URL's origin: scheme, host, port) got no timely success: cut at --webhook-timeout, or failed
-- only after as long as makes a host slow. The receiver's silence, as attempts see it ("<since ms> <last ms>":
-- since when no attempt to it got a timely success, and when the last such attempt ended), goes on to now; it
-- starts over at now when there is none (a success, or a quick failure, deleted it) or when the last such
-- attempt is more than ARGV[3] ms old: a time with no attempt to see it (an outage of every delivery process)
-- is no silence.
-- KEYS[1] the receivers' silences sg:cbsilent (one hash, every delivery process's)
-- ARGV[1] origin   ARGV[2] now (ms)   ARGV[3] the longest gap between two attempts of one silence (ms)
-- Returns the silence's start (ms).
local seen = redis.call('HGET', KEYS[1], ARGV[1])
local since, last
if seen then since, last = string.match(seen, '^(%d+) (%d+)$') end
local now = tonumber(ARGV[2])
if not since or now - tonumber(last) > tonumber(ARGV[3]) then
  since, last = ARGV[2], ARGV[2]
elseif now > tonumber(last) then
  last = ARGV[2]
end
redis.call('HSET', KEYS[1], ARGV[1], since .. ' ' .. last)
return tonumber(since)
