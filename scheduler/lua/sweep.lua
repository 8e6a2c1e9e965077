-- sweep.lua (control plane): the clock-driven part of one group's scheduling, run by every
-- scheduler process: close the runs whose worker lease lapsed (retiring that worker), promote
-- requests waiting past their class's max wait while a higher class has work (aging), raise requests
-- whose deadline's slack runs out (by up to dlb classes, never above the highest class with work), end
-- those whose deadline passed with "on_deadline_miss": "fail" (ready heads, dld, and requests still
-- waiting behind their session's head, dlq; a dlq entry whose request is gone or ended is dropped, checked
-- in turn), forget a batch of the counters of tenants idle for a session ttl that no longer matter
-- (fairness.lua forget_idle_counters), and dispatch when the group's quota now admits work.
-- Idempotent; safe to run anywhere.
-- On a cluster an expired request's "rid|sid" is returned ("behind:rid|sid" for one from dlq); the
-- scheduler ends it on the data plane (expire.lua), then withdraws it here. Its entry in dld (dlq) goes
-- at once: a scheduler that dies in between leaves it to run late rather than to fail (one whose data
-- master refuses puts it back).
-- On one server a lost run is handed back in this call; on a cluster its "rid|attempt" is returned
-- and the scheduler hands it back on the data plane, then releases it here (release.lua). Its lease
-- stays until that release, so a scheduler that dies in between leaves it for the next sweep.
-- KEYS[1] the group's control prefix sg:{g:<group>}:
-- ARGV[1] flags   ARGV[2] lease ms (this scheduler's; a worker's own recorded lease goes first: for the
-- lost-worker test below and its runs' first lease at dispatch, runs.lua worker_lease)
-- ARGV[3] max attempts (a lost worker counts as a failed attempt)
-- ARGV[4] session ttl s (also how long a tenant stays idle before its counter may go)
-- Notes its pass in the group's qs (sw; gr, the workers' grace after a restart: runs.lua store_grace; vsc,
-- where its scan of the tenants' counters goes on: fairness.lua forget_idle_counters, which keeps vi too;
-- dqt and dqi, when and from where its check of dlq goes on: see below).
-- Clears the group's hint list (cp .. 'hint', the scheduler loop's wake-up): see the end.
-- Returns {lapsed runs, promoted, dispatched, next wake ms or -1, now ms, number of runs to hand back,
-- "reason:rid|attempt" to hand back..., expired "rid|sid" or "behind:rid|sid" to end on the data plane...,
-- "check:rid|sid" dlq entries to take out if their request is gone or ended (cluster; see below)...};
-- the expiries are decided at this call's clock (its `now`, passed on to expire.lua).
-- A request's effective class (the request hash's ep, shown as effective_priority) is written with its
-- promotion on one server; on a cluster its "rid|class" is pushed to epw (capped at EPW_MAX, the newest
-- kept), and the scheduler that swept writes it on the data plane (scheduler/loop.py): runs.lua note_class.
local DLQ_CHECK, DLQ_CHECK_MS = 50, 5000 -- dlq entries checked a pass, and how often (below)
local cp, lease, max_attempts, ttl = KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now = clock()
local grace = store_grace(cp, now)
local lapsed, promoted = 0, 0
local lost = {}
for _, key in ipairs(redis.call('ZRANGEBYSCORE', cp .. 'leases', '-inf', now, 'LIMIT', 0, 200)) do
  local rec = run_record(cp, key)
  if not rec then
    redis.call('ZREM', cp .. 'leases', key)
  else
    -- A lapsed lease means its worker stopped heartbeating, or heartbeats without this run: the
    -- assignment still waits in its inbox behind a busy event loop. A worker not heard from for most of
    -- a lease (its liveness key, whose value is its last beat, is old or gone) is lost: retired now
    -- (the key can outlive its last beat's lease by a moment, key expiry running on the server's own
    -- clock, frozen while a script runs), or the requeued run could go straight back to it through
    -- one of its idle tickets; a worker that was only paused finds out at its next heartbeat,
    -- rejoins and offers its free slots again. That loss counts against the request's
    -- --max-attempts. A worker that beat since keeps its slots, and the stop does not count
    -- (lease_lapsed): a slow worker is not a failed attempt. Its late start is fenced. "A lease" is the
    -- worker's own (runs.lua worker_lease): it beats on its own --heartbeat-seconds, which may be longer
    -- than this scheduler's lease.
    -- After the store came back (a restart, a failover: runs.lua store_grace) a worker's silence counts from
    -- the grace's start, not from its last beat: no worker could beat while the store was down, and a store
    -- outage is no failed attempt. A run of a worker not heard from since has its lease put off to the
    -- grace's end (its worker renews it at its next beat, as it rejoins): not stopped, and not counted. A
    -- worker still silent then is lost, as above.
    local beat = tonumber(redis.call('GET', kworker(cp, rec.w)) or '')
    local wlease = worker_lease(cp, rec.w, lease)
    local unheard = grace and (not beat or beat < grace) -- not heard from since the store came back
    if unheard and now - grace < wlease * 0.9 then
      redis.call('ZADD', cp .. 'leases', 'XX', grace + wlease, key)
    else
      local heard = unheard and grace or beat
      local reason = 'lease_lapsed'
      if not heard or now - heard >= wlease * 0.9 then
        reason = 'worker_lost'
        redis.call('DEL', kworker(cp, rec.w))
        redis.call('LREM', cp .. 'idle', 0, rec.w)
        redis.call('HDEL', cp .. 'wl', rec.w) -- recorded again when it beats or registers
      end
      lapsed = lapsed + 1
      if single_server then
        local _, _, produced, spec, nxt = d_stop(rec.rid, tostring(rec.a), nil, reason, max_attempts, now,
          ttl, false)
        release(cp, key, produced, spec, now)
        if nxt then ready(gpre(nxt.g), nxt, now, lease) end
      else
        lost[#lost + 1] = reason .. ':' .. key
      end
    end
  end
end
local pol = policy(cp)
-- Aging bounds the wait that higher classes impose: only classes below the highest class with
-- ready work are promoted. The highest class is served by fair share, which starves no tenant;
-- promoting it too would let the longest-waiting (lowest-weight) tenants jump the fair order.
local highest = tonumber(redis.call('ZREVRANGEBYSCORE', cp .. 'cls', 9, '-inf', 'LIMIT', 0, 1)[1] or -1)
for cls = 0, highest - 1 do
  local limit = now - pol['mw' .. cls] * 1000
  for _, sid in ipairs(redis.call('ZRANGEBYSCORE', cp .. 'age' .. cls, '-inf', limit, 'LIMIT', 0, 100)) do
    local spec = ready_head(cp, sid)
    if spec and remove_ready(cp, sid, spec.tn, cls, spec.dl) then
      spec.ep = 10
      make_ready(cp, spec, now, true)
      note_class(cp, spec.rid, 10)
      promoted = promoted + 1
    else
      redis.call('ZREM', cp .. 'age' .. cls, sid)
    end
  end
end
-- Deadlines whose slack runs out: up by at most dlb classes, and not past the highest class with work,
-- nor past the tenant's max_priority (mx: a guardrail the submit checked holds for the boost too).
-- Only a request still on time (fairness.lua deadline_rank: not passed, nor forecast to miss) is raised,
-- as make_ready only notes one that is: a sweep that comes after the deadline must not lift late work
-- ahead of the class it is raised into. The aging clock keeps running in the raised class (as in runs.lua
-- release), or a boost would let a request wait longer than one without a deadline.
for _, sid in ipairs(redis.call('ZRANGEBYSCORE', cp .. 'dlp', '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', cp .. 'dlp', sid)
  local spec = ready_head(cp, sid)
  local cls = spec and spec.ep
  if spec and spec.dl and cls < math.min(highest, spec.mx or highest) and spec.dl > now
      and deadline_rank(cp, spec, now, pol) == spec.dl then
    local raised = math.min(cls + pol.dlb, highest, spec.mx or highest)
    local aged = redis.call('ZSCORE', cp .. 'age' .. cls, sid)
    remove_ready(cp, sid, spec.tn, cls, true)
    spec.ep, spec.bo = raised, 1
    make_ready(cp, spec, now, true)
    if aged and raised < 10 then redis.call('ZADD', cp .. 'age' .. raised, aged, sid) end
    note_class(cp, spec.rid, raised)
    promoted = promoted + 1
  end
end
if promoted > 0 then trim_classes(cp) end
-- Deadlines missed while waiting: the request ranks behind on-time work (fairness.lua), or fails then.
local expired = {}
for _, sid in ipairs(redis.call('ZRANGEBYSCORE', cp .. 'dld', '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', cp .. 'dld', sid)
  local spec = ready_head(cp, sid)
  if spec and spec.dl and not spec.dm then
    redis.call('ZADD', cp .. 'c' .. spec.ep .. ':' .. spec.tn, 'XX', deadline_rank(cp, spec, now, pol), sid)
  elseif spec and spec.dm and spec.dl <= now then
    if single_server then
      local outcome, r, nxt = d_expire(spec.rid, now, ttl, false)
      if outcome == 'expired' then
        withdraw(cp, spec.rid, r.a, sid, nil, now, lease)
        if nxt then ready(gpre(nxt.g), nxt, now, lease) end
      end
    else
      -- ended on the data plane next (expire.lua, at this call's clock); meanwhile ranked as late, so
      -- that this call's dispatch does not start it first
      redis.call('ZADD', cp .. 'c' .. spec.ep .. ':' .. spec.tn, 'XX', deadline_rank(cp, spec, now, pol), sid)
      expired[#expired + 1] = spec.rid .. '|' .. sid
    end
  end
end
-- The same for requests submitted behind their session's head (never readied: not in dld). The data plane
-- decides (d_expire, behind): one that became the head meanwhile is dld's, one that started or ended is kept.
for _, entry in ipairs(redis.call('ZRANGEBYSCORE', cp .. 'dlq', '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', cp .. 'dlq', entry)
  if single_server then
    local rid, sid = string.match(entry, '^([^|]*)|(.*)$')
    local outcome, r, nxt = d_expire(rid, now, ttl, false, true)
    if outcome == 'expired' then -- as for a head (though nothing of it should be here, nor a next head)
      withdraw(cp, rid, r.a, sid, nil, now, lease)
      if nxt then ready(gpre(nxt.g), nxt, now, lease) end
    end
  else
    expired[#expired + 1] = 'behind:' .. entry
  end
end
-- An entry whose request ended or was never stored: a cluster's cancel whose control step (withdraw.lua)
-- failed, or a submit whose answers were lost (maybe_stored: noted whether stored or not). Nothing else
-- takes it out before its deadline, up to a day away: a batch of DLQ_CHECK, taken in turn (qs dqi: where
-- the batch before ended), is checked every DLQ_CHECK_MS (qs dqt: the next check), and an entry whose
-- request is gone or ended goes. On a cluster its "check:rid|sid" is returned: the scheduler reads the
-- request's status on its data plane and takes the entry out there (sessions/transitions.py).
local qs = cp .. 'qs'
local checks = {}
local size = redis.call('ZCARD', cp .. 'dlq')
if size > 0 and now >= (tonumber(redis.call('HGET', qs, 'dqt') or '') or 0) then
  redis.call('HSET', qs, 'dqt', now + DLQ_CHECK_MS)
  local from = tonumber(redis.call('HGET', qs, 'dqi') or '') or 0
  if from >= size then from = 0 end
  local batch = redis.call('ZRANGE', cp .. 'dlq', from, from + DLQ_CHECK - 1)
  local dropped = 0
  for _, entry in ipairs(batch) do
    if single_server then
      local rid = string.match(entry, '^([^|]*)|')
      local status = rid and redis.call('HGET', kreq(rid), 'st')
      if not status or TERMINAL[status] then
        redis.call('ZREM', cp .. 'dlq', entry)
        dropped = dropped + 1
      end
    else
      checks[#checks + 1] = 'check:' .. entry
    end
  end
  if from + #batch >= size then
    redis.call('HDEL', qs, 'dqi')
  else
    redis.call('HSET', qs, 'dqi', from + #batch - dropped)
  end
end
-- Idle tenants' counters that no longer matter (fairness.lua); a caller that gives no ttl knows no grace.
if ttl then forget_idle_counters(cp, now, ttl * 1000) end
redis.call('HDEL', cp .. 'qs', 'wake', 'qwake') -- its dispatch notes them again if they still hold
local started = dispatch(cp, now, lease, true)
local nxt = tonumber(redis.call('HGET', cp .. 'qs', 'wake') or '')
for _, zset in ipairs({ 'dlp', 'dld', 'dlq' }) do
  local first = redis.call('ZRANGE', cp .. zset, 0, 0, 'WITHSCORES')[2]
  if first and (not nxt or tonumber(first) < nxt) then nxt = tonumber(first) end
end
-- This call saw every change made before it and returns the earliest wake-up: a hint left in the list
-- (pushed before it, or by its own dispatch, note_wake) would only end the loop's next wait at once, and
-- a throttled group would sweep in a busy loop. A hint pushed by a later call survives. The wake-up is
-- noted (qs wake), deadlines' included: a later call hints the loop only for a wake earlier than it
-- (quotas.lua note_wake, fairness.lua note_deadline_wake).
if nxt then redis.call('HSET', cp .. 'qs', 'wake', nxt) end
redis.call('DEL', cp .. 'hint')
local reply = { lapsed, promoted, started, nxt and tostring(nxt) or '-1', tostring(now), #lost }
for _, key in ipairs(lost) do reply[#reply + 1] = key end
for _, entry in ipairs(expired) do reply[#reply + 1] = entry end
for _, entry in ipairs(checks) do reply[#reply + 1] = entry end
return reply
