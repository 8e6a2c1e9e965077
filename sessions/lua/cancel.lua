-- cancel.lua: cancel a queued, preempted or running request. A running request's worker is told at
-- once (control channel) and is fenced from writing; its slot returns when it lets go.
-- KEYS[1] request hash sg:r:<rid>
-- ARGV[1] lease ms   ARGV[2] session ttl s   ARGV[3] request id   ARGV[4] owner to enforce ("" = none)
-- Returns {"cancelled"} | {"terminal", status} | {"missing"} | {"forbidden"}.
local lease, ttl, rid = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local r = load(rid, RUN_FIELDS)
if not r.st then return { 'missing' } end
if ARGV[4] ~= '' and r.tn ~= ARGV[4] then return { 'forbidden' } end
if TERMINAL[r.st] then return { 'terminal', r.st } end
local now = clock()
if r.st == 'running' then
  end_run(rid, r, now)
  redis.call('ZADD', kg(r.g, 'pre'), now + lease, rid .. '|' .. r.a)
  redis.call('PUBLISH', kworker(r.w) .. ':ctl', rid .. '|' .. r.a)
else
  if redis.call('LINDEX', kqueue(r.sid), 0) == rid then remove_ready(r.sid, r.g, r.tn, r.ep) end
  depth(r, -1)
end
local next_group = finalize(rid, r, 'cancelled', 'cancelled',
  { request_id = rid, tokens = tonumber(r.n) }, now, ttl)
dispatch_after(r.g, next_group, now, lease)
return { 'cancelled' }
