-- fairness.lua: the ready set and the weighted virtual token counters (VTC, Sheng et al. OSDI'24).
--
-- A session is ready when its head request waits to run; the group holds that request's ready spec
-- in rq[sid] (in the form ready_specs.lua gives it). Ready sessions are indexed by class (cls), by
-- tenant within a class (c<P>, score = the tenant's virtual counter) and by deadline within a tenant
-- (c<P>:<T>): a request's own deadline (dl, its time-to-first-token objective), or for one without,
-- its ready time plus the deadline horizon (policy dlh): earliest deadline first, requests without one
-- in FIFO order, and none waits more than the horizon behind later requests with deadlines. Deadlines
-- only reorder a tenant's own requests: which tenant goes next is the counters' choice alone.
--
-- A request whose deadline passed while it waited, or is forecast to pass before its turn comes (see
-- forecast_miss), ranks its class's max wait after its deadline (deadline + mw<p>): under overload,
-- work that will miss must not take the turns of work that can still make it (EDF's domino effect,
-- where every request ends up served just too late). It still runs, in deadline order, ahead of
-- on-time work due later than that: aging's bound, so nothing waits forever. Forecasting the misses at
-- the start, rather than finding them at the deadline, keeps the on-time queue one that can be served
-- in time: at 2x overload it is what lets tight deadlines through (loadtest/scenarios/deadlines.py).
--
-- Deadlines also feed two sweeps (sweep.lua): dlp (sid -> when its slack runs out: deadline minus the
-- promotion window, policy dlw) raises a request by up to dlb classes, never above the highest class
-- with ready work; dld (sid -> deadline) re-ranks a request once its deadline passes, or fails it
-- ("on_deadline_miss": "fail"). Only a head is ready: dlq ("rid|sid" -> deadline) holds the "fail" ones
-- submitted behind their session's head, until they are readied (dispatch.lua ready) or the sweep ends them.
--
-- A counter lives in vtc (the truth) and, while the tenant is backlogged, as its score in bt
-- (always current) and in every class zset it is part of, where the score may lag behind the counter
-- but is never ahead of it. A dispatch raises its tenant's counter without touching the class zsets
-- (up to ten writes saved per decision); pick_tenant catches a lagging head up before taking it. A
-- counter that goes down (a run produced less than its estimate) is written to every class zset at
-- once: a score ahead of its counter would hide the tenant from pick_tenant.

local function vtc_get(cp, tenant)
  return tonumber(redis.call('HGET', cp .. 'vtc', tenant) or '0') or 0
end

-- The counter a tenant entering the backlog is lifted to, if below it (make_ready; dispatch.lua start_alone,
-- with none backlogged): the least backlogged counter, or with none the last one charged (vlast), or 0.
local function vtc_floor(cp)
  local least = redis.call('ZRANGE', cp .. 'bt', 0, 0, 'WITHSCORES')[2]
  return tonumber(least or redis.call('GET', cp .. 'vlast') or '0') or 0
end

local function vtc_set(cp, tenant, value, old)
  redis.call('HSET', cp .. 'vtc', tenant, value)
  redis.call('ZADD', cp .. 'bt', 'XX', value, tenant)
  if value < old then
    for _, cls in ipairs(redis.call('ZRANGE', cp .. 'cls', 0, -1)) do
      redis.call('ZADD', cp .. 'c' .. cls, 'XX', value, tenant)
    end
  end
end

-- The backlogged tenant of class `cls` with the least counter, and that counter. Scores lag, never
-- lead: a head whose score equals its counter has the least counter of all. A lagging head is
-- caught up and the next head looked at (each catch-up is one lag fewer, so this ends).
local function pick_tenant(cp, cls)
  local zset = cp .. 'c' .. cls
  while true do
    local head = redis.call('ZRANGE', zset, 0, 0, 'WITHSCORES')
    local counter = vtc_get(cp, head[1])
    if tonumber(head[2]) >= counter then return head[1], counter end
    redis.call('ZADD', zset, counter, head[1])
  end
end

-- A request's deadline is forecast to be missed when the work ranked ahead of it in its tenant's queue,
-- at the pace the tenant is served now (its running runs, each turning over in the group's mean run
-- duration, rdur), would take longer than its slack, times the forecast factor (policy dlf; 0: never).
-- Nothing to go by (the tenant runs nothing yet, no run has ended yet): no forecast.
local function forecast_miss(cp, spec, now, pol)
  if pol.dlf == 0 then return false end
  local held = redis.call('ZCARD', cp .. 'rt:' .. spec.tn)
  if held == 0 then return false end
  local duration = tonumber(redis.call('GET', cp .. 'rdur') or '')
  if not duration then return false end
  local ahead = redis.call('ZCOUNT', cp .. 'c' .. spec.ep .. ':' .. spec.tn, '-inf', '(' .. spec.dl)
  return now + ahead * duration / held * pol.dlf > spec.dl
end

-- A ready request's rank among its tenant's in its class (lowest first): see above. A missed deadline
-- (passed, or forecast) ranks its class's max wait after it (aging's bound, policy mw<p>).
local function deadline_rank(cp, spec, now, pol)
  if not spec.dl then return spec.rs + pol.dlh end
  if spec.dl <= now or forecast_miss(cp, spec, now, pol) then return spec.dl + pol['mw' .. spec.p] * 1000 end
  return spec.dl
end

-- The group's scheduler loop sleeps until the wake its last sweep noted (qs wake, sweep.lua), or a hint:
-- a deadline entry due before that wake hints it, or its boost (or its "fail") would wait for the periodic
-- sweep, up to --sweep-seconds late, past a short deadline's promotion window. As quotas.lua note_wake
-- (defined after this file), but with one read: it is on a deadline request's way to its first token.
-- The hint list is cut to one entry, rather than read first (a hint already there would end the loop's
-- next wait again at once).
local function note_deadline_wake(cp, wake)
  local current = tonumber(redis.call('HGET', cp .. 'qs', 'wake') or '')
  if current and wake >= current then return end
  redis.call('HSET', cp .. 'qs', 'wake', wake)
  redis.call('LPUSH', cp .. 'hint', 1)
  redis.call('LTRIM', cp .. 'hint', 0, 0)
end

-- Make a head request ready. `keep_counter`: the request was already admitted (requeued after a
-- preemption or a lost worker, or promoted by aging), so its tenant is not a newcomer and keeps its
-- counter. The spec keeps its first ready time (rs): a requeued request stays ahead of later ones.
local function make_ready(cp, spec, now, keep_counter)
  local tenant, cls, sid = spec.tn, spec.ep, spec.sid
  spec.rs = spec.rs or now
  redis.call('HSET', cp .. 'rq', sid, spec_encode(spec))
  local pol = policy(cp)
  local rank = deadline_rank(cp, spec, now, pol)
  redis.call('ZADD', cp .. 'c' .. cls .. ':' .. tenant, rank, sid)
  if cls < 10 then redis.call('ZADD', cp .. 'age' .. cls, now, sid) end
  if spec.dl then
    local on_time = rank == spec.dl -- not missed, nor forecast to: only such a request is worth raising
    local wake -- the earliest sweep this request needs: its boost, or its "fail"
    if on_time and cls < math.min(9, spec.mx or 9) and not spec.bo and pol.dlb > 0 then
      wake = spec.dl - pol.dlw
      redis.call('ZADD', cp .. 'dlp', wake, sid)
    end
    if spec.dm or spec.dl > now then
      redis.call('ZADD', cp .. 'dld', spec.dl, sid)
      if spec.dm and not wake then wake = spec.dl end -- (a boost comes first: its sweep notes the dl)
    end
    if wake then note_deadline_wake(cp, wake) end
  end
  local counter = vtc_get(cp, tenant)
  if redis.call('HINCRBY', cp .. 'btn', tenant, 1) == 1 then
    -- A returning tenant is lifted to the least backlogged counter: no credit banked while idle. (A
    -- counter kept here was never forgotten: forget_idle_counters takes none of a tenant waiting or running.)
    local floor = vtc_floor(cp)
    if counter < floor and not keep_counter then
      counter = floor
      redis.call('HSET', cp .. 'vtc', tenant, counter)
    end
    redis.call('ZADD', cp .. 'bt', counter, tenant)
  end
  redis.call('ZADD', cp .. 'c' .. cls, counter, tenant)
  redis.call('ZADD', cp .. 'cls', cls, cls)
  redis.call('HINCRBY', cp .. 'cn', cls, 1)
end

-- `timed`: the request has a deadline (only then is it in the deadline sweeps' sets).
local function remove_ready(cp, sid, tenant, cls, timed)
  local sessions = cp .. 'c' .. cls .. ':' .. tenant
  if redis.call('ZREM', sessions, sid) == 0 then return false end
  redis.call('HDEL', cp .. 'rq', sid)
  redis.call('ZREM', cp .. 'age' .. cls, sid)
  if timed then
    redis.call('ZREM', cp .. 'dlp', sid)
    redis.call('ZREM', cp .. 'dld', sid)
  end
  if redis.call('EXISTS', sessions) == 0 then redis.call('ZREM', cp .. 'c' .. cls, tenant) end
  if redis.call('HINCRBY', cp .. 'cn', cls, -1) <= 0 then
    redis.call('HDEL', cp .. 'cn', cls)
    redis.call('ZREM', cp .. 'cls', cls)
  end
  if redis.call('HINCRBY', cp .. 'btn', tenant, -1) <= 0 then
    redis.call('HDEL', cp .. 'btn', tenant)
    redis.call('ZREM', cp .. 'bt', tenant)
  end
  return true
end

local function ready_head(cp, sid)
  local raw = redis.call('HGET', cp .. 'rq', sid)
  return raw and spec_decode(raw, sid, cp) or nil
end

-- An idle tenant's counter is forgotten (HDEL vtc) once it has been idle a while (`grace`: the sweep gives
-- the session TTL) and forgetting changes nothing: the tenant has no backlog (btn) and no run record (ri), and
-- its counter is at or below the floor, which its return would lift it to anyway, as it lifts a tenant never
-- seen (make_ready), and the floor cannot fall below it before the runs in flight end (lowest_floor). Else vtc keeps a field for every tenant name ever sent (with auth off, any name a client
-- sends), for good, and every read of it (admin stats) grows with them. A counter above the floor (the tenant
-- used more than the backlogged ones: it returns behind them) stays until the floor passes it. The sweep does
-- it (sweep.lua), VTC_SCAN fields a pass (HSCAN, its cursor in qs vsc, and in a page of more, qs vso): vi holds when a pass first found each
-- tenant idle (dropped when one finds it active, or it is forgotten), so the grace counts from there (a tenant
-- active only between two passes over it keeps its mark: it may go a grace early, which changes nothing
-- either). Only while vtc holds more fields than there are backlogged (bt) or running (ro) tenants: else
-- every counter is an active tenant's, and no mark is left (a busy group's pass pays four calls); a release
-- or a dispatch, on every request's way, pays nothing. Returns the number forgotten.
-- The lowest the floor can fall to before the runs in flight end, and the tenants that hold a run record (ri:
-- running, or stopped and not yet let go): a run's end refunds what it was charged beyond what it produced, at
-- most its whole estimate (w_out * ce + w_in * it, over the weight it was charged at), and a refund to a
-- backlogged tenant lowers the floor, or a refunded tenant's next charge vlast. A counter forgotten above that
-- would come back lifted to less than it stood at (credit for what it used); one with a run record is never
-- forgotten (its end corrects the counter). One read of the group's run records a pass: as many as its slots.
local function lowest_floor(cp)
  local pol, floor, holding = policy(cp), vtc_floor(cp), {}
  for _, raw in ipairs(redis.call('HVALS', cp .. 'ri')) do
    local ok, rec = pcall(cjson.decode, raw)
    if ok and type(rec) == 'table' and rec.tn then
      holding[rec.tn] = true
      local charged = pol.w_out * (tonumber(rec.ce) or 0) + pol.w_in * (tonumber(rec.it) or 0)
      local low = vtc_get(cp, rec.tn) - charged / (tonumber(rec.tw) or weight(cp, rec.tn))
      if low < floor then floor = low end
    end
  end
  return floor, holding
end

local VTC_SCAN = 50
local function forget_idle_counters(cp, now, grace)
  local counters, marks = cp .. 'vtc', cp .. 'vi'
  local active = math.max(redis.call('ZCARD', cp .. 'bt'), redis.call('ZCARD', cp .. 'ro'))
  if redis.call('HLEN', counters) <= active then
    redis.call('DEL', marks)
    return 0
  end
  local qs = cp .. 'qs'
  local page = redis.call('HSCAN', counters, redis.call('HGET', qs, 'vsc') or '0', 'COUNT', VTC_SCAN)
  -- A small hash (a listpack: up to 512 fields) answers whole whatever COUNT says: its page is taken VTC_SCAN
  -- fields a pass, from where the pass before left it (qs vso), so that no pass blocks the server for long.
  local fields = page[2]
  local offset = tonumber(redis.call('HGET', qs, 'vso') or '') or 0
  if offset >= #fields then offset = 0 end -- the page shrank since (fields forgotten): from its start
  local last = math.min(#fields, offset + 2 * VTC_SCAN)
  if last < #fields then
    redis.call('HSET', qs, 'vso', last) -- the same cursor next pass, for the rest of this page
  else
    redis.call('HDEL', qs, 'vso')
    if page[1] == '0' then
      redis.call('HDEL', qs, 'vsc')
    else
      redis.call('HSET', qs, 'vsc', page[1])
    end
  end
  local floor, holding = lowest_floor(cp)
  local forgotten = 0
  for i = offset + 1, last, 2 do
    local tenant = fields[i]
    if holding[tenant] or redis.call('HEXISTS', cp .. 'btn', tenant) == 1 then
      redis.call('ZREM', marks, tenant)
    else
      local since = tonumber(redis.call('ZSCORE', marks, tenant))
      if not since then
        redis.call('ZADD', marks, now, tenant)
      elseif now - since >= grace and (tonumber(fields[i + 1]) or 0) <= floor then
        forgotten = forgotten + redis.call('HDEL', counters, tenant)
        redis.call('ZREM', marks, tenant)
      end
    end
  end
  return forgotten
end
