-- callback_attach.lua (run with EVAL outside the function library, right after a submit that gave a
-- callback_url): note the callback on the request. The terminal step queues the delivery of a request
-- that has `cb` when it ends (includes/ended.lua); one that ended before this call gets its delivery
-- queued here. Both are atomic in the request's slot, so exactly one of them queues it.
-- KEYS[1] the request hash sg:{s:<bucket>}:r:<rid>   KEYS[2] the bucket's due callbacks sg:{s:<bucket>}:cb
-- ARGV[1] request id   ARGV[2] callback URL   ARGV[3..] the terminal statuses
-- Returns 1 | 0 when there is no such request.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'cb', ARGV[2])
local status = redis.call('HGET', KEYS[1], 'st')
for i = 3, #ARGV do
  if status == ARGV[i] then
    local t = redis.call('TIME')
    redis.call('ZADD', KEYS[2], 'NX', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[1])
  end
end
return 1
