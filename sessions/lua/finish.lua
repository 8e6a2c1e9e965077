-- finish.lua: end a run as done or failed, advance the session, return the worker's slot ticket
-- and dispatch into the freed slot at once.
-- KEYS[1] request hash sg:r:<rid>
-- ARGV[1] lease ms   ARGV[2] session ttl s   ARGV[3] request id   ARGV[4] attempt   ARGV[5] worker id
-- ARGV[6] outcome ("done" | "failed")   ARGV[7] finish_reason or error message
-- ARGV[8] return the slot ticket ("1" | "0")   ARGV[9] the worker's group (where its ticket goes)
-- Returns {1, status} when finished, {0, status} when the worker no longer owned the request.
-- An attempt lets go of its slot once: the request remembers it (field rel<attempt>, one per
-- attempt, since attempts are not released in order), so a call repeated
-- because its reply was lost (client retry after a dropped connection) never returns a 2nd ticket.
local lease, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local rid, attempt, wid, outcome, detail = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local now = clock()
local r = load(rid, RUN_FIELDS)
local group = r.g
if r.st and redis.call('HEXISTS', KEYS[1], 'rel' .. attempt) == 1 then return { 0, r.st } end
local finished, next_group = 0, nil
if owns(r, attempt, wid) then
  end_run(rid, r, now)
  local tokens = tonumber(r.n)
  if outcome == 'done' then
    next_group = finalize(rid, r, 'done', 'done',
      { request_id = rid, tokens = tokens, finish_reason = detail }, now, ttl)
  else
    redis.call('HSET', KEYS[1], 'err', detail)
    next_group = finalize(rid, r, 'failed', 'error',
      { request_id = rid, tokens = tokens, message = detail }, now, ttl)
  end
  finished = 1
elseif group then
  redis.call('ZREM', kg(group, 'pre'), rid .. '|' .. attempt)
end
if r.st then redis.call('HSET', KEYS[1], 'rel' .. attempt, 1) end
if ARGV[8] == '1' and redis.call('EXISTS', kworker(wid)) == 1 then
  redis.call('LPUSH', kg(ARGV[9], 'idle'), wid)
end
dispatch_after(group or ARGV[9], next_group, now, lease)
return { finished, r.st or 'missing' }
