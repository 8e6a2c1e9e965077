-- common.lua: helpers shared by every Sluicegate script. sessions/scripts.py loads this file and
-- every script as one function library (FUNCTION LOAD): this part runs once, at load, and each
-- script becomes a function that calls begin_call() first and hands its result (or its error) to
-- end_call(). It takes no KEYS or ARGV of its own. Locals here outlive a call, so anything kept per
-- call must be reset in begin_call().
--
-- Keyspace (every key starts with "sg:"; the README's "Keyspace" section is the full table):
--   sg:r:<rid>              hash   one request (short field names, see api/views.py)
--   sg:r:<rid>:in           string its prompt or messages JSON (deleted when the request ends)
--   sg:s:<sid>:m            hash   session meta: seq (last event id), base (first id kept), tn (owner)
--   sg:s:<sid>:q            list   the session's lite queue of request ids (head = current request)
--   sg:s:<sid>:l            list   the session's event log, one "id|event|rid|json" entry per event
--   sg:e:<sid>              pubsub live copy of each log append
--   sg:g:<G>:cls            zset   priority classes of group G with ready sessions
--   sg:g:<G>:c<P>           zset   tenants with ready sessions in class P, score = virtual token counter
--   sg:g:<G>:c<P>:<T>       zset   ready sessions of tenant T in class P, score = ready time (FIFO)
--   sg:g:<G>:age<P>         zset   ready sessions in class P by time they entered it (aging)
--   sg:g:<G>:cn / btn       hash   ready sessions per class / per tenant
--   sg:g:<G>:bt             zset   backlogged tenants, score = virtual token counter
--   sg:g:<G>:vtc            hash   virtual token counter per tenant
--   sg:g:<G>:run            zset   running requests, score ranks preemption victims first
--   sg:g:<G>:pre            zset   slots being freed (preempted or cancelled, worker not yet released)
--   sg:g:<G>:idle           list   one ticket (worker id) per free worker slot
--   sg:g:<G>:wk             zset   the group's workers by last heartbeat (ms): the dead ones get reaped
--   sg:g:<G>:cfg / qs       hash   group quota settings / quota state
--   sg:leases               zset   running request id -> lease expiry (ms)
--   sg:wake                 zset   group -> time its quota admits the next request (ms)
--   sg:w:<wid>              string worker liveness (PX lease); sg:w:<wid>:in list = its inbox of
--                                  assignments ("rid|attempt\n" + run spec JSON, see start_run)
--   sg:m:*                  hash   cluster-wide metrics (counters and histogram buckets)

local PREFIX = 'sg:'
local RANK = 1e13 -- running-rank score = class * RANK + (RANK - start ms)
local BUCKETS = { {{BUCKETS}} }

local function kreq(rid) return PREFIX .. 'r:' .. rid end
local function kinput(rid) return PREFIX .. 'r:' .. rid .. ':in' end
local function kmeta(sid) return PREFIX .. 's:' .. sid .. ':m' end
local function kqueue(sid) return PREFIX .. 's:' .. sid .. ':q' end
local function klog(sid) return PREFIX .. 's:' .. sid .. ':l' end
local function kchan(sid) return PREFIX .. 'e:' .. sid end
local function kg(group, suffix) return PREFIX .. 'g:' .. group .. ':' .. suffix end
local function kworker(wid) return PREFIX .. 'w:' .. wid end

local TERMINAL = { done = true, failed = true, cancelled = true }

-- Milliseconds since the epoch from the server clock, so every process agrees on "now".
-- Tests may pin the clock by setting sg:clock (ms).
local function clock()
  local pinned = redis.call('GET', PREFIX .. 'clock')
  if pinned then return tonumber(pinned) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end

local function seconds(ms) return string.format('%.6f', ms / 1000) end

local POLICY_DEFAULTS = {
  w_in = 1, w_out = 2, est = 1, min_run = 50, max_pre = 20,
  mw0 = 60, mw1 = 60, mw2 = 60, mw3 = 60, mw4 = 60, mw5 = 60, mw6 = 60, mw7 = 60, mw8 = 60, mw9 = 60,
}
local policy_cache = nil -- per call: an admin may change sg:policy between two calls
local outbox, outbox_sessions = {}, {} -- per call: the events emitted, by session (see emit_many)

local function begin_call()
  policy_cache = nil
  outbox, outbox_sessions = {}, {}
end

local function policy()
  if policy_cache then return policy_cache end
  policy_cache = {}
  local stored = redis.call('HGETALL', PREFIX .. 'policy')
  for name, value in pairs(POLICY_DEFAULTS) do policy_cache[name] = value end
  for i = 1, #stored, 2 do policy_cache[stored[i]] = tonumber(stored[i + 1]) end
  return policy_cache
end

local function weight(tenant)
  return tonumber(redis.call('HGET', PREFIX .. 'tenants', tenant) or '1') or 1
end

-- Load the listed fields of a request into a table (nil fields stay nil).
local function load(rid, names)
  local values = redis.call('HMGET', kreq(rid), unpack(names))
  local r = {}
  for i, name in ipairs(names) do r[name] = values[i] end
  return r
end

---------------------------------------------------------------------------------------------------
-- Events: append to the session log and publish the same entries for live readers.
---------------------------------------------------------------------------------------------------
-- Events get their ids at once; they are written when the call ends, one RPUSH and one PUBLISH per
-- session however many events it emitted (a submit that starts its request at once emits `queued`
-- and `started`: one log write and one message for the API to read, on the first token's way).
local function emit_many(sid, items)
  local last = redis.call('HINCRBY', kmeta(sid), 'seq', #items)
  local first = last - #items + 1
  local entries = outbox[sid]
  if not entries then
    entries = {}
    outbox[sid] = entries
    outbox_sessions[#outbox_sessions + 1] = sid
  end
  for i, item in ipairs(items) do
    entries[#entries + 1] = (first + i - 1) .. '|' .. item[1] .. '|' .. item[2] .. '|' .. item[3]
  end
  return first
end

-- Every call ends here, with pcall's results: the events go out even when the call failed half-way
-- (an id taken must have its entry, or the log's offsets would no longer match the ids), then the
-- error, if any, is raised again.
local function end_call(ok, result)
  for _, sid in ipairs(outbox_sessions) do
    local entries = outbox[sid]
    redis.call('RPUSH', klog(sid), unpack(entries))
    redis.call('PUBLISH', kchan(sid), table.concat(entries, '\n'))
  end
  if not ok then error(result, 0) end
  return result
end

local function emit(sid, event, rid, data)
  return emit_many(sid, { { event, rid, cjson.encode(data) } })
end

---------------------------------------------------------------------------------------------------
-- Metrics, kept in Redis so that every API process reports the cluster's totals.
---------------------------------------------------------------------------------------------------
local function observe(name, label, secs)
  local bucket = #BUCKETS + 1
  for i, le in ipairs(BUCKETS) do
    if secs <= le then bucket = i; break end
  end
  local key = PREFIX .. 'm:' .. name
  redis.call('HINCRBY', key, label .. '|' .. bucket, 1)
  if secs ~= 0 then redis.call('HINCRBYFLOAT', key, label .. '|sum', secs) end
end

local function count(name, label, by)
  redis.call('HINCRBY', PREFIX .. 'm:' .. name, label, by or 1)
end

local function depth(r, by)
  count('depth', r.g .. '|' .. r.p .. '|' .. r.tn, by)
end

---------------------------------------------------------------------------------------------------
-- Virtual token counters (weighted VTC). A counter lives in vtc (the truth) and, while the tenant
-- is backlogged, as its score in bt (always current) and in every class zset it is part of, where
-- the score may lag behind the counter but is never ahead of it. A dispatch raises its tenant's
-- counter without touching the class zsets (up to ten writes saved per decision); pick_tenant
-- catches a lagging head up before taking it. A counter that goes down (a run produced less than
-- its estimate) is written to every class zset at once: a score ahead of its counter would hide
-- the tenant from pick_tenant.
---------------------------------------------------------------------------------------------------
local function vtc_get(group, tenant)
  return tonumber(redis.call('HGET', kg(group, 'vtc'), tenant) or '0') or 0
end

local function vtc_set(group, tenant, value, old)
  redis.call('HSET', kg(group, 'vtc'), tenant, value)
  redis.call('ZADD', kg(group, 'bt'), 'XX', value, tenant)
  if value < old then
    for _, cls in ipairs(redis.call('ZRANGE', kg(group, 'cls'), 0, -1)) do
      redis.call('ZADD', kg(group, 'c' .. cls), 'XX', value, tenant)
    end
  end
end

-- The backlogged tenant of class `cls` with the least counter, and that counter. Scores lag, never
-- lead: a head whose score equals its counter has the least counter of all. A lagging head is
-- caught up and the next head looked at (each catch-up is one lag fewer, so this ends).
local function pick_tenant(group, cls)
  local zset = kg(group, 'c' .. cls)
  while true do
    local head = redis.call('ZRANGE', zset, 0, 0, 'WITHSCORES')
    local counter = vtc_get(group, head[1])
    if tonumber(head[2]) >= counter then return head[1], counter end
    redis.call('ZADD', zset, counter, head[1])
  end
end

---------------------------------------------------------------------------------------------------
-- The ready set: a session is ready when its head request waits to run.
---------------------------------------------------------------------------------------------------
-- `keep_counter`: the request was already admitted (requeued after a preemption or a lost worker,
-- or promoted by aging), so its tenant is not a newcomer and keeps its counter.
local function make_ready(rid, now, keep_counter)
  local r = load(rid, { 'sid', 'g', 'tn', 'ep', 'rs' })
  local group, tenant, cls = r.g, r.tn, r.ep
  local ready_score = tonumber(r.rs)
  if not ready_score then
    ready_score = now
    redis.call('HSET', kreq(rid), 'rs', now)
  end
  redis.call('ZADD', kg(group, 'c' .. cls .. ':' .. tenant), ready_score, r.sid)
  if tonumber(cls) < 10 then redis.call('ZADD', kg(group, 'age' .. cls), now, r.sid) end
  local counter = vtc_get(group, tenant)
  if redis.call('HINCRBY', kg(group, 'btn'), tenant, 1) == 1 then
    -- A returning tenant is lifted to the least backlogged counter: no credit banked while idle.
    local least = redis.call('ZRANGE', kg(group, 'bt'), 0, 0, 'WITHSCORES')[2]
    local floor = tonumber(least or redis.call('GET', kg(group, 'vlast')) or '0')
    if counter < floor and not keep_counter then
      counter = floor
      redis.call('HSET', kg(group, 'vtc'), tenant, counter)
    end
    redis.call('ZADD', kg(group, 'bt'), counter, tenant)
  end
  redis.call('ZADD', kg(group, 'c' .. cls), counter, tenant)
  redis.call('ZADD', kg(group, 'cls'), cls, cls)
  redis.call('HINCRBY', kg(group, 'cn'), cls, 1)
end

local function remove_ready(sid, group, tenant, cls)
  local sessions = kg(group, 'c' .. cls .. ':' .. tenant)
  if redis.call('ZREM', sessions, sid) == 0 then return false end
  redis.call('ZREM', kg(group, 'age' .. cls), sid)
  if redis.call('EXISTS', sessions) == 0 then redis.call('ZREM', kg(group, 'c' .. cls), tenant) end
  if redis.call('HINCRBY', kg(group, 'cn'), cls, -1) <= 0 then
    redis.call('HDEL', kg(group, 'cn'), cls)
    redis.call('ZREM', kg(group, 'cls'), cls)
  end
  if redis.call('HINCRBY', kg(group, 'btn'), tenant, -1) <= 0 then
    redis.call('HDEL', kg(group, 'btn'), tenant)
    redis.call('ZREM', kg(group, 'bt'), tenant)
  end
  return true
end

---------------------------------------------------------------------------------------------------
-- Group quotas: GCRA for requests/s (with burst), a token bucket for tokens/s that may go into
-- debt by a reservation, and a cap on concurrency.
---------------------------------------------------------------------------------------------------
local function quota_config(group)
  local c = redis.call('HMGET', kg(group, 'cfg'), 'requests_per_second', 'tokens_per_second', 'burst',
    'max_concurrency', 'burst_tokens')
  local cfg = { rps = tonumber(c[1]), tps = tonumber(c[2]), burst = tonumber(c[3]) or 1, mc = tonumber(c[4]) }
  if cfg.tps then cfg.cap = tonumber(c[5]) or cfg.tps end
  return cfg
end

local function token_level(group, cfg, now)
  local s = redis.call('HMGET', kg(group, 'qs'), 'lvl', 'at')
  local level, at = tonumber(s[1]), tonumber(s[2])
  if not level then return cfg.cap end
  return math.min(cfg.cap, level + (now - at) * cfg.tps / 1000)
end

-- The GCRA theoretical arrival time, never in the past. It is stored with the interval it was
-- computed at ('ti'): after a rate change the outstanding debt is rescaled to the new interval, so
-- a new rate applies from the next decision (raised: no waiting out the old interval; lowered: the
-- burst already used is not forgotten).
local function gcra_tat(group, interval, now)
  local s = redis.call('HMGET', kg(group, 'qs'), 'tat', 'ti')
  local tat, ti = tonumber(s[1]), tonumber(s[2])
  if not tat or tat <= now then return now end
  if ti and ti ~= interval then return now + (tat - now) * interval / ti end
  return tat
end

-- Slots in use: running requests plus preempted or cancelled runs whose worker has not let go.
local function in_flight(group, now)
  redis.call('ZREMRANGEBYSCORE', kg(group, 'pre'), '-inf', now)
  return redis.call('ZCARD', kg(group, 'run')) + redis.call('ZCARD', kg(group, 'pre'))
end

-- Returns ok, wake_ms (when a rate quota will admit it), reason.
local function quota_gate(group, cfg, reserve, first_run, now)
  if cfg.rps and first_run then
    local interval = 1000 / cfg.rps
    local allow_at = gcra_tat(group, interval, now) - (cfg.burst - 1) * interval
    if allow_at > now + 0.001 then return false, allow_at, 'requests_per_second' end
  end
  if cfg.tps then
    local need = math.min(reserve, cfg.cap)
    local level = token_level(group, cfg, now)
    if level < need then return false, now + (need - level) * 1000 / cfg.tps, 'tokens_per_second' end
  end
  if cfg.mc and in_flight(group, now) >= cfg.mc then return false, nil, 'max_concurrency' end
  return true
end

local function quota_take(group, cfg, reserve, first_run, now)
  if cfg.rps and first_run then
    local interval = 1000 / cfg.rps
    redis.call('HSET', kg(group, 'qs'), 'tat', gcra_tat(group, interval, now) + interval, 'ti', interval)
  end
  if cfg.tps then
    redis.call('HSET', kg(group, 'qs'), 'lvl', token_level(group, cfg, now) - reserve, 'at', now)
  end
end

local function quota_refund(group, unused, now)
  local cfg = quota_config(group)
  if cfg.tps and unused > 0 then
    redis.call('HSET', kg(group, 'qs'), 'lvl', math.min(cfg.cap, token_level(group, cfg, now) + unused), 'at', now)
  end
end

---------------------------------------------------------------------------------------------------
-- Runs: start, end, preempt, requeue.
---------------------------------------------------------------------------------------------------
local RUN_FIELDS = { 'sid', 'g', 'tn', 'p', 'ep', 'n', 'a', 'w', 'ds', 'dn', 'ce', 'cr', 'st', 'pc', 'mt' }

-- Close the accounting of a run that is ending for any reason: reconcile the tenant counter and
-- the token quota with what was really produced, and drop the run and its lease.
local function end_run(rid, r, now)
  redis.call('ZREM', kg(r.g, 'run'), rid)
  redis.call('ZREM', PREFIX .. 'leases', rid)
  local produced = tonumber(r.n) - tonumber(r.dn or r.n)
  local pol = policy()
  local correction = pol.w_out * (produced - tonumber(r.ce or produced)) / weight(r.tn)
  if correction ~= 0 then
    local counter = vtc_get(r.g, r.tn)
    vtc_set(r.g, r.tn, counter + correction, counter)
  end
  quota_refund(r.g, tonumber(r.cr or produced) - produced, now)
end

local function take_ticket(group)
  while true do
    local wid = redis.call('RPOP', kg(group, 'idle'))
    if not wid then return nil end
    if redis.call('EXISTS', kworker(wid)) == 1 then return wid end
  end
end

-- The worker's assignment: "rid|attempt", a newline, then the run spec as JSON (the fields the
-- worker would otherwise read back, saving that round trip on the way to the first token). An
-- input longer than INLINE_INPUT is left out (`in` absent): the worker reads it from sg:r:<rid>:in.
local INLINE_INPUT = 8192
local function assignment(rid, attempt, r)
  local spec = { sid = r.sid, g = r.g, tn = r.tn, p = r.p, mt = r.mt, n = r.n, ik = r.ik, pa = r.pa }
  local text = r['in']
  if not text and redis.call('STRLEN', kinput(rid)) <= INLINE_INPUT then -- a long input is not copied
    text = redis.call('GET', kinput(rid))
  end
  if text and #text <= INLINE_INPUT then spec['in'] = text end
  return rid .. '|' .. attempt .. '\n' .. cjson.encode(spec)
end

-- The request fields a dispatch reads: the quota gate's, start_run's and the assignment's.
local DISPATCH_FIELDS = { 'mt', 'n', 'a', 'it', 'sub', 'p', 'ep', 'tn', 'g', 'sid', 'ik', 'pa' }

-- Start a request that is out of the ready set (the caller took it out, and off the depth gauge).
local function start_run(group, cls, tenant, counter, sid, rid, r, wid, cfg, now, lease)
  local attempt = tonumber(r.a) + 1
  local produced = tonumber(r.n)
  local remaining = tonumber(r.mt) - produced
  local pol = policy()
  local estimate = math.ceil(remaining * pol.est)
  local input_cost = (produced == 0 and attempt == 1) and pol.w_in * tonumber(r.it) or 0
  local charged = counter + (input_cost + pol.w_out * estimate) / weight(tenant)
  vtc_set(group, tenant, charged, counter)
  redis.call('SET', kg(group, 'vlast'), charged)
  quota_take(group, cfg, remaining, attempt == 1, now)
  redis.call('HSET', kreq(rid), 'st', 'running', 'a', attempt, 'w', wid, 'ds', now, 'dn', produced,
    'ce', estimate, 'cr', remaining, attempt == 1 and 'sa' or 'ds', now)
  if attempt == 1 then observe('wait', group .. '|' .. r.p, (now - tonumber(r.sub)) / 1000) end
  redis.call('ZADD', kg(group, 'run'), tonumber(cls) * RANK + (RANK - now), rid)
  redis.call('ZADD', PREFIX .. 'leases', now + lease, rid)
  emit(sid, attempt == 1 and 'started' or 'resumed', rid,
    { request_id = rid, index = produced, attempt = attempt, worker = wid })
  redis.call('LPUSH', kworker(wid) .. ':in', assignment(rid, attempt, r))
end

-- Put a request that was running back at the head of its session's turn in the ready set.
-- `freeing` records a slot whose worker has not let go yet (so preemption does not overshoot).
-- `reason` is a label ("priority", "worker_lost", ...), optionally followed by ": detail"; only the
-- label reaches metrics (bounded cardinality), the detail goes into the event.
local function requeue(rid, r, now, reason, freeing, lease)
  local label, detail = string.match(reason, '^([%w_]+):%s*(.*)$')
  reason = label or reason
  end_run(rid, r, now)
  redis.call('HSET', kreq(rid), 'st', 'preempted')
  if reason == 'priority' then redis.call('HINCRBY', kreq(rid), 'pc', 1) end
  if freeing then redis.call('ZADD', kg(r.g, 'pre'), now + lease, rid .. '|' .. r.a) end
  if r.w then redis.call('PUBLISH', kworker(r.w) .. ':ctl', rid .. '|' .. r.a) end
  depth(r, 1)
  count('preemptions', r.g .. '|' .. r.p .. '|' .. reason)
  emit(r.sid, 'preempted', rid, { request_id = rid, index = tonumber(r.n), reason = reason, detail = detail })
  make_ready(rid, now, true)
end

local function note_wake(group, wake)
  redis.call('ZADD', PREFIX .. 'wake', 'LT', wake, group)
  if redis.call('LLEN', PREFIX .. 'hint') == 0 then redis.call('LPUSH', PREFIX .. 'hint', group) end
end

-- Preempt the lowest-ranked running requests (lowest class, then most recently started) while
-- more requests of a higher class wait than slots are already being freed (sg:g:G:pre).
-- Aged requests (class 10) never preempt, but the real classes waiting below them still do.
-- Anti-thrash: a run that used up its max preemptions is immune and skipped; a run inside its
-- min-run quantum is passed over only for an older run of its own class, never for a higher
-- class: the group is woken when the quantum ends and the victim is taken then.
local function preempt_for(group, top, now, lease)
  -- The lowest-ranked runs first: most decisions end here, when none ranks below the waiting class.
  local victims = redis.call('ZRANGE', kg(group, 'run'), 0, 31, 'WITHSCORES')
  if #victims == 0 or math.floor(tonumber(victims[2]) / RANK) >= math.min(top, 9) then return end
  if top > 9 then
    top = tonumber(redis.call('ZREVRANGEBYSCORE', kg(group, 'cls'), 9, '-inf', 'LIMIT', 0, 1)[1])
    if not top then return end
  end
  local pol = policy()
  redis.call('ZREMRANGEBYSCORE', kg(group, 'pre'), '-inf', now)
  local pending = redis.call('ZCARD', kg(group, 'pre'))
  local waiting = {}
  local counts = redis.call('HGETALL', kg(group, 'cn'))
  for i = 1, #counts, 2 do waiting[tonumber(counts[i])] = tonumber(counts[i + 1]) end
  local quantum_cls = nil
  for i = 1, #victims, 2 do
    local vcls = math.floor(tonumber(victims[i + 1]) / RANK)
    if vcls >= top or (quantum_cls and vcls > quantum_cls) then return end
    local above = 0
    for c = vcls + 1, 9 do above = above + (waiting[c] or 0) end
    if above <= pending then return end
    local r = load(victims[i], RUN_FIELDS)
    if tonumber(r.pc or '0') < pol.max_pre then
      local ripe = tonumber(r.ds) + pol.min_run
      if now >= ripe then
        requeue(victims[i], r, now, 'priority', true, lease)
        pending = pending + 1
      else
        quantum_cls = quantum_cls or vcls
        note_wake(group, ripe)
      end
    end
  end
end

-- The scheduling decision: highest class, then the backlogged tenant with the least virtual
-- token counter, then that tenant's oldest ready session; gated by the group's quota.
local function dispatch(group, now, lease)
  local started = 0
  local cfg = quota_config(group)
  -- With no rate quota to consult, a free slot is all a request waits for: take the ticket first,
  -- and with none (the common case under load) skip the tenant/session/request lookup.
  local ticket_first = not (cfg.rps or cfg.tps)
  for _ = 1, 64 do
    local top = redis.call('ZREVRANGE', kg(group, 'cls'), 0, 0)[1]
    if not top then break end
    local wid = ticket_first and take_ticket(group)
    if ticket_first and not wid then
      preempt_for(group, tonumber(top), now, lease)
      break
    end
    local tenant, counter = pick_tenant(group, top)
    local sid = redis.call('ZRANGE', kg(group, 'c' .. top .. ':' .. tenant), 0, 0)[1]
    local rid = redis.call('LINDEX', kqueue(sid), 0)
    local r = load(rid, DISPATCH_FIELDS)
    local reserve = tonumber(r.mt) - tonumber(r.n)
    local ok, wake, why = quota_gate(group, cfg, reserve, tonumber(r.a) == 0, now)
    if not ok then
      if wid then redis.call('RPUSH', kg(group, 'idle'), wid) end -- the ticket goes back where it was
      redis.call('HSET', kg(group, 'qs'), 'throttled', why, 'throttled_at', now)
      if wake then note_wake(group, wake) else preempt_for(group, tonumber(top), now, lease) end
      break
    end
    wid = wid or take_ticket(group)
    if not wid then
      preempt_for(group, tonumber(top), now, lease)
      break
    end
    remove_ready(sid, group, tenant, top)
    depth(r, -1)
    start_run(group, top, tenant, counter, sid, rid, r, wid, cfg, now, lease)
    started = started + 1
  end
  return started
end

-- A request that becomes ready while nothing else in its group is ready is the decision's only
-- candidate: start it at once when the quota and a free slot allow, without passing through the
-- ready set or the depth gauge (about twenty commands saved on the way to its first token). Its
-- tenant returns from idle: as in make_ready, its counter is lifted to the last dispatched counter
-- (no tenant is backlogged). `r`: the request's DISPATCH_FIELDS, as submit just stored them (and
-- `in`, its input). Returns false, having taken no slot, when the decision must go the usual way.
local function start_alone(rid, r, now, lease)
  local group, tenant = r.g, r.tn
  if redis.call('EXISTS', kg(group, 'cls')) == 1 then return false end
  local cfg = quota_config(group)
  if not quota_gate(group, cfg, tonumber(r.mt) - tonumber(r.n), tonumber(r.a) == 0, now) then return false end
  local wid = take_ticket(group)
  if not wid then return false end
  local counter = math.max(vtc_get(group, tenant), tonumber(redis.call('GET', kg(group, 'vlast')) or '0'))
  start_run(group, r.ep, tenant, counter, r.sid, rid, r, wid, cfg, now, lease)
  return true
end

---------------------------------------------------------------------------------------------------
-- Sessions: terminal states and the session's next turn.
---------------------------------------------------------------------------------------------------

-- Remove a finished request from its session queue; make the next one ready or, when the session
-- has no work left, start its idle TTL. Returns the group of the next request, if any.
local function advance(sid, rid, now, ttl)
  local was_head = redis.call('LINDEX', kqueue(sid), 0) == rid
  redis.call('LREM', kqueue(sid), 1, rid)
  if not was_head then return nil end
  local next_rid = redis.call('LINDEX', kqueue(sid), 0)
  if next_rid then
    make_ready(next_rid, now)
    return redis.call('HGET', kreq(next_rid), 'g')
  end
  redis.call('EXPIRE', kmeta(sid), ttl)
  redis.call('EXPIRE', klog(sid), ttl)
  return nil
end

local function finalize(rid, r, status, event, data, now, ttl)
  redis.call('HSET', kreq(rid), 'st', status, 'fin', now)
  redis.call('EXPIRE', kreq(rid), ttl)
  redis.call('DEL', kinput(rid))
  count('requests', r.g .. '|' .. r.p .. '|' .. r.tn .. '|' .. status)
  emit(r.sid, event, rid, data)
  return advance(r.sid, rid, now, ttl)
end

local function dispatch_after(group, next_group, now, lease)
  dispatch(group, now, lease)
  if next_group and next_group ~= group then dispatch(next_group, now, lease) end
end

local function owns(r, attempt, wid)
  return r.st == 'running' and r.a == attempt and (wid == nil or r.w == wid)
end
