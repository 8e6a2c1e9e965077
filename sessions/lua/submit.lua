-- submit.lua: store a request, append it to its session's lite queue (creating the session on
-- first use), emit `queued`, and dispatch at once if the session was idle.
-- KEYS[1] request hash  sg:r:<rid>
-- KEYS[2] session meta  sg:s:<sid>:m
-- KEYS[3] session queue sg:s:<sid>:q
-- KEYS[4] session log   sg:s:<sid>:l
-- KEYS[5] request input sg:r:<rid>:in (a string of its own: a large prompt never bloats the hash)
-- ARGV[1] lease ms   ARGV[2] request id   ARGV[3] session id   ARGV[4] tenant   ARGV[5] group
-- ARGV[6] priority   ARGV[7] max_tokens   ARGV[8] input (prompt text or messages JSON)
-- ARGV[9] input kind ("p" prompt | "m" messages)   ARGV[10] params JSON   ARGV[11] input tokens
-- ARGV[12] owner to enforce ("" = none)
-- Returns {"ok", seq of the queued event} or {"forbidden", owner}.
local lease = tonumber(ARGV[1])
local rid, sid, tenant, group, prio = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
-- Request ids are 72 random bits: an existing one is this very submission, replayed by a client
-- retry after a lost reply. Answer as the first time did, without storing it twice.
if redis.call('EXISTS', KEYS[1]) == 1 then return { 'ok', redis.call('HGET', KEYS[1], 'fs') } end
local owner = redis.call('HGET', KEYS[2], 'tn')
if ARGV[12] ~= '' and owner and owner ~= ARGV[12] then return { 'forbidden', owner } end
local now = clock()
if not owner then redis.call('HSET', KEYS[2], 'tn', tenant) end
local position = redis.call('RPUSH', KEYS[3], rid)
if position == 1 then -- the session was idle, so its meta and log had a TTL
  redis.call('PERSIST', KEYS[2])
  redis.call('PERSIST', KEYS[4])
end
local seq = emit(sid, 'queued', rid, { request_id = rid, priority = tonumber(prio), position = position - 1 })
-- At the head of its session's queue the request is ready from now on (rs: its ready time).
local r = { sid = sid, tn = tenant, g = group, p = prio, ep = prio, mt = ARGV[7], ik = ARGV[9], pa = ARGV[10],
  it = ARGV[11], st = 'queued', sub = now, n = 0, a = 0, fs = seq, rs = position == 1 and now or nil }
local fields = {}
for name, value in pairs(r) do
  fields[#fields + 1] = name
  fields[#fields + 1] = value
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('SET', KEYS[5], ARGV[8])
redis.call('SADD', PREFIX .. 'groups', group)
count('requests', group .. '|' .. prio .. '|' .. tenant .. '|submitted')
r['in'] = ARGV[8] -- carried into the assignment when it is short (no read back)
if position == 1 and start_alone(rid, r, now, lease) then return { 'ok', seq } end
depth(r, 1)
if position == 1 then
  make_ready(rid, now)
  dispatch(group, now, lease)
end
return { 'ok', seq }
