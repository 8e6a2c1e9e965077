-- handback.lua: a worker gives a running request back (shutting down, or its backend failed after
-- tokens streamed): it goes back to the head of its session's turn and resumes elsewhere from the
-- tokens so far. Also releases the slot when the worker no longer owned the request.
-- KEYS[1] request hash sg:r:<rid>
-- ARGV[1] lease ms   ARGV[2] request id   ARGV[3] attempt   ARGV[4] worker id   ARGV[5] reason
-- ARGV[6] return the slot ticket ("1" | "0")   ARGV[7] the worker's group (where its ticket goes)
-- Returns {1, status} when handed back, {0, status} when not owned. Like finish, an attempt lets go
-- of its slot once (field rel<attempt>: every attempt separately, since they are not released in order): a repeated call is a no-op.
local lease = tonumber(ARGV[1])
local rid, attempt, wid, reason = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local now = clock()
local r = load(rid, RUN_FIELDS)
if r.st and redis.call('HEXISTS', KEYS[1], 'rel' .. attempt) == 1 then return { 0, r.st } end
local done = 0
if owns(r, attempt, wid) then
  requeue(rid, r, now, reason, false, lease)
  done = 1
elseif r.g then
  redis.call('ZREM', kg(r.g, 'pre'), rid .. '|' .. attempt)
end
if r.st then redis.call('HSET', KEYS[1], 'rel' .. attempt, 1) end
if ARGV[6] == '1' and redis.call('EXISTS', kworker(wid)) == 1 then
  redis.call('LPUSH', kg(ARGV[7], 'idle'), wid)
end
dispatch(r.g or ARGV[7], now, lease)
return { done, r.st or 'missing' }
