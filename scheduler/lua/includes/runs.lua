-- runs.lua: a run is one attempt of a request on one worker slot, known to the control plane by its
-- record ri["rid|attempt"] (the request's ready spec plus what the dispatch charged: its estimate ce,
-- the tokens reserved cr, the tenant's weight tw; JSON, one per run in flight). The record
-- lives from dispatch until the worker lets go (or its lease lapses): its presence is what makes
-- release idempotent (a repeated release finds no record and only hands the slot back).

local RANK = 1e13 -- running-rank score = class * RANK + (RANK - start ms)

-- Who holds the group's running slots: rt:<tenant> (its runs, by the running-rank score) and ro
-- (tenant -> its runs / its weight; rescored at a weight change by rescore_share, set_weight.lua).
-- Fair-share preemption (preemption.lua) reads both. A run counts from its dispatch until it leaves
-- the running set (stopped, or ended).
local function run_added(cp, key, tenant, tenant_weight, score)
  local mine = cp .. 'rt:' .. tenant
  redis.call('ZADD', mine, score, key)
  redis.call('ZADD', cp .. 'ro', redis.call('ZCARD', mine) / tenant_weight, tenant)
end

local function run_removed(cp, key, tenant)
  if redis.call('ZREM', cp .. 'run', key) == 0 then return false end
  local mine = cp .. 'rt:' .. tenant
  redis.call('ZREM', mine, key)
  local held = redis.call('ZCARD', mine)
  if held == 0 then
    redis.call('ZREM', cp .. 'ro', tenant)
  else
    redis.call('ZADD', cp .. 'ro', held / weight(cp, tenant), tenant)
  end
  return true
end

-- The tenant's weight was just changed (set_weight.lua): its ro entry rescored at the weight now, as
-- run_added and run_removed score it, so that fair-share preemption ranks it by that weight from the next
-- decision on, not from its next start or stop. Returns the runs it holds in the group.
local function rescore_share(cp, tenant)
  local held = redis.call('ZCARD', cp .. 'rt:' .. tenant)
  if held > 0 then redis.call('ZADD', cp .. 'ro', held / weight(cp, tenant), tenant) end
  return held
end

-- The group's mean run duration (ms, a moving average over the runs that finished, having produced
-- tokens: not those stopped, lost or refused at their start): the pace a deadline forecast goes by
-- (fairness.lua forecast_miss).
local function note_run_duration(cp, ms)
  local mean = tonumber(redis.call('GET', cp .. 'rdur') or '')
  redis.call('SET', cp .. 'rdur', mean and mean + 0.1 * (ms - mean) or ms)
end

local function run_record(cp, key)
  local raw = redis.call('HGET', cp .. 'ri', key)
  return raw and cjson.decode(raw) or nil
end

-- Close the accounting of a run: reconcile the tenant's counter and the token quota with what it
-- produced (nil when unknown, e.g. its worker was lost: the estimate stands) and, when the backend
-- counted them, with the request's real input tokens (charged once, by estimate, at its first
-- dispatch); and drop it from the running set and the leases. The correction is divided by the weight
-- the dispatch charged at (tw), not the tenant's weight now: a weight changed while the run was in
-- flight would otherwise scale its correction (from 1 to 0.01: a hundredfold refund). A record written
-- before tw existed (a rolling upgrade) is corrected at the weight now.
local function end_run(cp, key, rec, produced, now, prompt, finished)
  local pol = policy(cp)
  redis.call('HDEL', cp .. 'ri', key)
  local was_running = run_removed(cp, key, rec.tn)
  -- the deadline forecast's pace, kept only while forecasts are on (a finish pays nothing otherwise)
  if was_running and finished and (produced or 0) > 0 and pol.dlf > 0 then note_run_duration(cp, now - rec.ds) end
  redis.call('ZREM', cp .. 'leases', key)
  redis.call('SREM', cp .. 'pin', key)
  produced = produced or rec.ce
  local correction = pol.w_out * (produced - rec.ce)
  if prompt and rec.it then correction = correction + pol.w_in * (prompt - rec.it) end
  correction = correction / (tonumber(rec.tw) or weight(cp, rec.tn))
  if correction ~= 0 then
    local counter = vtc_get(cp, rec.tn) -- never forgotten while this record is (forget_idle_counters)
    vtc_set(cp, rec.tn, counter + correction, counter)
  end
  quota_refund(cp, (rec.cr or 0) - produced, now, rec.cg)
end

-- The inbox format from which a worker reads "rid|attempt|reason" (INBOX_FORMAT in sessions/transitions.py).
local INBOX_WITH_REASON = 2

-- What a worker registered (sessions/transitions.py, register_worker): {} when nothing readable.
local function worker_info(cp, wid)
  local ok, info = pcall(cjson.decode, redis.call('HGET', cp .. 'workers', wid) or '')
  return ok and type(info) == 'table' and info or {}
end

-- How a worker's engine resumes a run, as it registered ("continue" | "regenerate"; nil: not said).
local function worker_resume(cp, wid)
  return worker_info(cp, wid).resume
end

-- The lease a worker renews its runs by (its --lease-seconds, ms), as it registered or last heartbeat
-- (hash wl, dropped with its other records); `fallback`, the caller's, for a worker that recorded none (an
-- older version). Its runs' first lease and the sweep's lost-worker test go by it: a worker's runs are
-- renewed on its own beat, which another process's shorter lease would not wait for.
local function worker_lease(cp, wid, fallback)
  return tonumber(redis.call('HGET', cp .. 'wl', wid) or '') or fallback
end

-- The server's own clock in microseconds (never the pinned one): below 2^53 for centuries yet.
local function server_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- When this library's first sweep came (server_us): a library local, reset whenever the library loads, so
-- whenever the server restarts (from its AOF), a replica takes over or a new version loads.
local first_call_us = false
local function library_first_call()
  if not first_call_us then first_call_us = server_us() end
  return first_call_us
end

-- The start of the group's workers' grace after the store came back (ms on the call's clock; nil: none
-- noted). While the store was down (or restarting, or failing over) no worker could beat: after it, every
-- liveness key has expired and every lease lapsed though the workers live, and a sweep would judge them all
-- lost, counting a failed attempt for every run in flight. So the first sweep after the library (re)loaded,
-- when the group was swept before it (qs sw, that pass's server_us), opens a grace (qs gr) of one lease from
-- its own `now`: until then the sweep counts a worker's silence from the grace, not from its last beat
-- (sweep.lua). A new version's first sweep opens one too, once: harmless.
local function store_grace(cp, now)
  local qs = cp .. 'qs'
  local noted = redis.call('HMGET', qs, 'sw', 'gr')
  local swept, grace = tonumber(noted[1] or ''), tonumber(noted[2] or '')
  local first = library_first_call() -- before this pass's sw: every pass of this load notes a later one
  if swept and swept < first then
    grace = now
    redis.call('HSET', qs, 'gr', now)
  end
  redis.call('HSET', qs, 'sw', server_us())
  return grace
end

local function take_ticket(cp)
  while true do
    local wid = redis.call('RPOP', cp .. 'idle')
    if not wid then return nil end
    if redis.call('EXISTS', kworker(cp, wid)) == 1 then return wid end
  end
end

local function return_ticket(cp, wid)
  if redis.call('EXISTS', kworker(cp, wid)) == 1 then redis.call('LPUSH', cp .. 'idle', wid) end
end

-- A request's effective class changed (a promotion, or a boost dropped): its hash's ep (shown as
-- effective_priority by GET /v1/requests/{rid}) is written at once on one server; on a cluster "rid|class"
-- goes to epw (the newest EPW_MAX kept: see trim_classes), and the scheduler that sweeps next writes it on
-- the data plane (scheduler/loop.py), in the order pushed.
local EPW_MAX = 10000
local function note_class(cp, rid, cls)
  if single_server then
    redis.call('HSET', kreq(rid), 'ep', cls)
  else
    redis.call('RPUSH', cp .. 'epw', rid .. '|' .. cls)
  end
end
local function trim_classes(cp)
  if not single_server then redis.call('LTRIM', cp .. 'epw', -EPW_MAX, -1) end
end

-- A waiting request's first token came (met or missed): its deadline binds no more (as ready_spec in
-- requests.lua reads it), nor does the class a deadline boost (bo) raised it to: it waits at its own class
-- again. Aging's class 10 is kept: that promotion is for its wait, not its deadline.
local function drop_deadline(spec)
  spec.dl, spec.dm, spec.mx = nil, nil, nil
  if spec.bo and spec.ep < 10 then spec.ep, spec.bo = spec.p, nil end
end

-- A deadline boost binds only until the first token, as the deadline does (drop_deadline): a run started at
-- the class a boost raised it to (bo) ranks at its own class again once the control plane sees its first
-- token (one server: `ft` in its request's hash), or its deadline pass (on a cluster the control plane sees
-- no token; a boost no longer helps a late request, which the sweep would not raise either). Else a request
-- of the raised class waited out its whole run: the run outranked it in the preemption's order. Its start
-- time stays in the score (the min-run quantum); its record, its ep and shown class follow, and the group's
-- scheduler is hinted, so that a higher class waiting preempts it at once. Called where the control plane
-- next touches a running run, the heartbeat: the first token's way (requests.lua d_append) stays the data
-- plane's alone. Returns whether it re-ranked the run.
local function unboost_run(cp, key, rec, now)
  local cls = tonumber(rec.cls)
  if not (rec.bo and cls and cls < 10 and cls ~= rec.p) then return false end
  if not redis.call('ZSCORE', cp .. 'run', key) then return false end -- stopped: no longer ranked
  local due = rec.dl and now >= rec.dl
  if not due and single_server then due = redis.call('HEXISTS', kreq(rec.rid), 'ft') == 1 end
  if not due then return false end
  local score = rec.p * RANK + (RANK - rec.ds)
  redis.call('ZADD', cp .. 'run', 'XX', score, key)
  redis.call('ZADD', cp .. 'rt:' .. rec.tn, 'XX', score, key)
  rec.cls, rec.ep, rec.bo = rec.p, rec.p, nil
  redis.call('HSET', cp .. 'ri', key, cjson.encode(rec))
  note_class(cp, rec.rid, rec.p)
  trim_classes(cp)
  hint_scheduler(cp)
  return true
end

-- The ready spec of a run's request, to put it back in the ready set (it keeps its ready time and
-- its class, which aging may have raised). `fresh`: the data plane's newer view (tokens so far).
local function spec_of(rec, fresh)
  local spec = {}
  for _, name in ipairs(SPEC_KEYS) do spec[name] = rec[name] end
  if fresh then
    spec.n, spec.a, spec.pc = fresh.n, math.max(fresh.a, rec.a), math.max(fresh.pc or 0, rec.pc or 0)
    if (tonumber(fresh.n) or 0) > 0 then drop_deadline(spec) end
  end
  return spec
end

-- Put a run's request back in the ready set. Skipped when its session already has another head
-- waiting: the session moved on (the request ended on the data plane, and the control step that
-- says so is still on its way), and a head readied from the data plane is the truth.
local function requeue_ready(cp, spec, now)
  local waiting = ready_head(cp, spec.sid)
  if waiting and waiting.rid ~= spec.rid then return false end
  if waiting then remove_ready(cp, spec.sid, waiting.tn, waiting.ep, waiting.dl) end
  make_ready(cp, spec, now, true)
  return true
end

-- Start a request that is out of the ready set (the caller took it out).
-- The assignment "rid|attempt" goes to the worker's inbox; a single-server call also starts the run
-- on the data plane at once (the `started` event, the fence) and carries the run spec in the
-- assignment, saving the worker a round trip. On a cluster, a request this plane preempted carries
-- the reason ("rid|attempt|reason", to a worker that reads inbox format 2): should the worker's start
-- come before the previous attempt's hand-back, it fences that attempt with the reason in its
-- `preempted` event (start.lua). Returns false when the request turned out to have ended (a stale
-- ready entry): the ticket goes back. The run's first lease is the worker's own (worker_lease; `lease`,
-- the caller's, only for a worker that recorded none).
local function start_run(cp, cls, tenant, counter, spec, wid, cfg, now, lease)
  local attempt = spec.a + 1
  local remaining = tokens_left(spec)
  local pol = policy(cp)
  local estimate = math.ceil(remaining * pol.est)
  local input_cost = (spec.n == 0 and attempt == 1) and pol.w_in * spec.it or 0
  local tenant_weight = weight(cp, tenant)
  local charged = counter + (input_cost + pol.w_out * estimate) / tenant_weight
  vtc_set(cp, tenant, charged, counter)
  redis.call('SET', cp .. 'vlast', charged)
  local bucket = quota_take(cp, cfg, remaining, attempt == 1, now)
  local key = spec.rid .. '|' .. attempt
  local rec = spec_of(spec)
  -- cr: the tokens reserved from the tokens/s bucket (quota_take), which its end refunds what it did not use
  -- of: none without that quota (a quota added while it runs must not be credited what it never took);
  -- cg: that bucket's generation, when not 0 (a quota removed and set again while it runs is a new bucket,
  -- which it took nothing from: quota_refund)
  rec.a, rec.w, rec.ds, rec.ce, rec.cr, rec.cls = attempt, wid, now, estimate, cfg.tps and remaining or 0, cls
  if bucket and bucket ~= 0 then rec.cg = bucket end
  rec.tw = tenant_weight -- the weight charged at, which end_run corrects by (7 bytes at the default 1)
  redis.call('HSET', cp .. 'ri', key, cjson.encode(rec))
  redis.call('HSET', cp .. 'tk', key, wid) -- the slot this attempt holds, given back once (let_go)
  redis.call('ZADD', cp .. 'run', cls * RANK + (RANK - now), key)
  run_added(cp, key, tenant, tenant_weight, cls * RANK + (RANK - now))
  redis.call('ZADD', cp .. 'leases', now + worker_lease(cp, wid, lease), key) -- renewed by that worker's beats
  if attempt == 1 then
    -- clamped: on a cluster `sub` is the data master's clock, `now` the control master's (a skew would
    -- make a quick dispatch's wait negative and the histogram's _sum go down, read as a counter reset)
    observe(cmetrics(cp), 'wait', spec.g .. '|' .. spec.p, math.max(0, now - spec.sub) / 1000)
    if spec.dl then observe(cmetrics(cp), 'slack', spec.g .. '|' .. spec.p, math.max(0, spec.dl - now) / 1000) end
  end
  local entry = key
  if single_server then
    local ok, run = d_start(spec.rid, attempt, wid, now, nil, attempt > 1 and worker_resume(cp, wid) or nil)
    if not ok then
      end_run(cp, key, rec, 0, now)
      redis.call('HDEL', cp .. 'tk', key)
      redis.call('RPUSH', cp .. 'idle', wid)
      return false
    end
    entry = key .. '\n' .. cjson.encode(run)
  elseif spec.rr and (tonumber(worker_info(cp, wid).inbox) or 1) >= INBOX_WITH_REASON then
    entry = key .. '|' .. spec.rr
  end
  redis.call('LPUSH', kworker(cp, wid) .. ':in', entry)
  return true
end

-- A worker lets go of run `key` (finished, handed back, or stopped after a notice), or the sweep
-- closes the run of a lost worker. `requeue`: the request's ready spec when it goes back to wait;
-- `prompt`: its input tokens as the backend counted them (see end_run).
-- A run the control plane already requeued (preempted on a cluster, record flag rq) only has its
-- waiting entry refreshed (its rr stays: harmless once the hand-back fenced the attempt), and re-ranked
-- without its deadline, and at its own class if a deadline boost raised it, when its first token came (the
-- data plane's spec has none: a deadline binds until the first token, as on one server, where the
-- preemption requeues it with that spec); a cancelled one (flag cx) is not requeued.
local function release(cp, key, produced, requeue, now, prompt)
  local rec = run_record(cp, key)
  if rec then
    end_run(cp, key, rec, produced, now, prompt, not requeue)
    if rec.rq and not requeue then
      -- Requeued by a preemption here, but it ended meanwhile on the data plane (it finished, or
      -- that was its last allowed attempt): its waiting entry goes.
      local waiting = ready_head(cp, rec.sid)
      if waiting and waiting.rid == rec.rid and (waiting.a or 0) <= rec.a then
        remove_ready(cp, rec.sid, waiting.tn, waiting.ep, waiting.dl)
      end
    end
    if requeue and not rec.cx then
      local spec = spec_of(rec, requeue)
      if rec.rq then
        local waiting = ready_head(cp, spec.sid)
        if waiting and waiting.rid == spec.rid then
          waiting.n, waiting.pc = spec.n, spec.pc
          if waiting.dl and not spec.dl then
            -- out of dlp and dld too (no boost, no expiry), and out of a boosted class's sets (requeue_ready
            -- removes the entry as stored); its aging clock keeps running from its requeue
            local boosted = waiting.ep
            local aged = boosted < 10 and redis.call('ZSCORE', cp .. 'age' .. boosted, spec.sid)
            drop_deadline(waiting)
            requeue_ready(cp, waiting, now)
            if aged then redis.call('ZADD', cp .. 'age' .. waiting.ep, aged, spec.sid) end
            -- shown too, after the boost's own entry (the hand-back's ready_spec may have been written before it)
            if waiting.ep ~= boosted then
              note_class(cp, spec.rid, waiting.ep)
              trim_classes(cp)
            end
          else
            redis.call('HSET', cp .. 'rq', spec.sid, spec_encode(waiting))
            -- A "fail" deadline still binds: noted for the sweep again. A sweep that came between the
            -- preemption and this hand-back took the entry out of dld, and the data plane, still running
            -- the request then, kept it: nothing else would end it past its deadline.
            if waiting.dm then redis.call('ZADD', cp .. 'dld', waiting.dl, spec.sid) end
          end
        end
      else
        requeue_ready(cp, spec, now)
      end
    end
  end
  redis.call('ZREM', cp .. 'pre', key)
end

-- Stop a running run for the control plane: out of the running set, its slot counted as being freed
-- until the worker lets go (unless `handed`: its slot already went to another run, and its attempt
-- gives no ticket back), and the worker told at once on its control channel.
local function stop_run(cp, key, rec, now, lease, reason, handed)
  run_removed(cp, key, rec.tn)
  if handed then
    redis.call('HDEL', cp .. 'tk', key)
  else
    redis.call('ZADD', cp .. 'pre', now + lease, key)
  end
  redis.call('SPUBLISH', kworker(cp, rec.w) .. ':ctl', key .. '|' .. reason)
end
