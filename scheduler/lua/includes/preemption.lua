-- preemption.lua: two ways a waiting request takes a running one's slot when none is free.
--
-- By priority (preempt_for): the lowest-ranked running request (lowest class, then most recently
-- started) stops and its slot goes at once to the waiting request of the higher class, unless slots
-- already being freed (pre) cover those waiting. Aged requests (class 10) never preempt, but the real
-- classes waiting below them still do, and take the slot they freed.
--
-- Either way the victim's slot is handed over (its ticket goes to the taker, who starts in the same
-- call): a slot that came back only when the victim's worker let go cost the taker that worker's
-- notice, cancel and hand-back (the wait of a high-priority request at overload), and the fair order
-- could give a freed slot straight back. The victim's worker holds one run more than its slots until
-- the victim stops at its next token. Except for priority under a max_concurrency cap, which bounds what
-- the engines run at once: there the stopped run counts until its worker lets go (pre), and its slot
-- comes back then.
--
-- By fair share (hand_over), inside one class, when no run of a lower class stops for the waiting
-- class (priority comes first: the lowest-ranked run stops): the first tenant in the fair order (of the first few
-- waiting) that is below the tenant furthest above its weighted share of the group's running slots
-- (ro: runs / weight) among those running a preemptible run of that class takes a slot from that one, when
-- it would still hold at least as much per weight after the swap as the taker does: no ping-pong, and a
-- tenant at or below its share is never preempted for another. Counters alone cannot see this: a tenant
-- returning from idle is lifted to the flooder's counter, so a tenant that floods keeps every slot the
-- others free and they queue behind its runs (the soak's TTFT). The victim tenant is looked for among the
-- first VICTIMS in ro, heaviest first: the heaviest overall may run in another class only (an interactive
-- tenant at a high class, or one run of a low-weight tenant), and the flooder of this class must still
-- give up a slot.
--
-- Anti-thrash, for both: a run that used up its max preemptions is immune and skipped, and so is a
-- run that streamed a tool-call delta (pin.lua: it could not be resumed faithfully); a run inside its
-- min-run quantum is passed over only for an older run of its own class, never for a higher
-- class: the group is woken when the quantum ends and the victim is taken then.

-- Preempt one run: its request goes back to the head of its session's turn at once. On one server
-- the data plane is fenced in the same call (the `preempted` event, the accounting); on a cluster
-- the worker's hand-back does that, and its run record stays until then (flag rq: requeued; rr: why).
-- The waiting spec keeps the reason too (rr), for a start that comes before that hand-back.
-- `reason`: 'priority' or 'fair_share'; `handed`: the slot goes to another run at once (stop_run).
local function preempt(cp, key, rec, now, lease, reason, handed)
  stop_run(cp, key, rec, now, lease, reason, handed)
  rec.pc = (rec.pc or 0) + 1
  local spec = spec_of(rec)
  if single_server then
    local _, _, produced, fresh = d_stop(rec.rid, tostring(rec.a), rec.w, reason)
    end_run(cp, key, rec, produced, now)
    if fresh then spec = spec_of(rec, fresh) end
  else
    rec.rq, rec.rr = 1, reason
    redis.call('HSET', cp .. 'ri', key, cjson.encode(rec))
    -- Its next attempt may start before this one's hand-back reaches the data plane: that start then
    -- fences this attempt, and says why it was stopped (start_run).
    spec.rr = reason
  end
  requeue_ready(cp, spec, now)
end

-- May this run be preempted now? (immune: used up its preemptions, or pinned); else when (ripe).
local function preemptible(cp, key, rec, pol, now)
  if not rec or (rec.pc or 0) >= pol.max_pre or redis.call('SISMEMBER', cp .. 'pin', key) == 1 then
    return false
  end
  local ripe = rec.ds + pol.min_run
  return now >= ripe, ripe
end

-- Can run `key`'s slot pass to another run? Its worker is alive (its presence key; a slot on a gone worker
-- would go nowhere), its backend is not shown down (a request sent there would only be handed back: the
-- worker withdrew its slots), and the run holds its slot's ticket there (a run whose ticket its worker's
-- re-offer dropped would leave that worker with one slot more than it has).
local function slot_can_pass(cp, key, rec)
  return redis.call('EXISTS', kworker(cp, rec.w)) == 1 and redis.call('HGET', cp .. 'tk', key) == rec.w
    and worker_info(cp, rec.w).backend ~= 'down'
end

-- The taker for a victim tenant holding `victim_share` runs per weight: of the first TAKERS tenants
-- waiting in class `cls` in the fair order (their scores may lag their counters: see fairness.lua), the
-- first that is not the victim's and would still hold no more per weight than the victim after the
-- swap; and its counter. Several tenants may flood at once: the head of the fair order may be another
-- flooder, and a tenant below its share behind it must still get its slot.
local TAKERS = 4

-- Fair share's candidate victims in class `cls`: of the first VICTIMS tenants in ro (furthest above
-- their weighted share of the running slots first), those holding a run of that class; each as { tenant,
-- what it holds per weight once it has given up one slot } (no taker may hold more after taking it).
-- Empty when nothing runs in the class among them. Bounded, as the takers are (TAKERS): one ZREVRANGE,
-- then per tenant a ZCOUNT and, for those kept, an HGET of its weight: 1 + 2 x VICTIMS commands at most.
-- A flooder of the class behind VICTIMS heavier tenants that hold no preemptible run of it is not seen
-- (the price of the bound; each of those holds more per weight than it does).
local VICTIMS = 4

local function fair_victims(cp, cls)
  local heaviest = redis.call('ZREVRANGE', cp .. 'ro', 0, VICTIMS - 1, 'WITHSCORES')
  local victims = {}
  for i = 1, #heaviest, 2 do
    local tenant = heaviest[i]
    if redis.call('ZCOUNT', cp .. 'rt:' .. tenant, cls * RANK, (cls + 1) * RANK - 1) > 0 then
      victims[#victims + 1] = { tenant, tonumber(heaviest[i + 1]) - 1 / weight(cp, tenant) }
    end
  end
  return victims
end

-- Would `tenant`, given one more slot, hold no more per weight than `victim_share`?
local function could_take(cp, tenant, victim_share)
  local tenant_weight = weight(cp, tenant)
  local runs = (tonumber(redis.call('ZSCORE', cp .. 'ro', tenant)) or 0) * tenant_weight
  return (runs + 1) / tenant_weight <= victim_share
end

local function taker_for(cp, cls, victim_tenant, victim_share)
  local waiting = redis.call('ZRANGE', cp .. 'c' .. cls, 0, TAKERS * 2 - 1)
  local seen = 0
  for _, tenant in ipairs(waiting) do
    if tenant ~= victim_tenant then
      if could_take(cp, tenant, victim_share) then return tenant, vtc_get(cp, tenant) end
      seen = seen + 1
      if seen == TAKERS then return nil end
    end
  end
  return nil
end

-- Swap run `key` (stopped for `reason`) for the head of `tenant`'s oldest ready session in class `cls`, which
-- starts on the run's worker in the same call (the slot's ticket is handed over). The swap leaves the runs in
-- flight as they were: only the rate quotas are asked. The taker's counter is read after the stop: on one
-- server the stopped run's end refunds its tenant, who may be the taker. Returns false and the quota's
-- wake-up when the rate quotas hold the request back (nothing stopped); else true, and whether it started
-- (if its request turned out to have ended, the slot's ticket is back in the idle list).
local function swap(cp, cls, tenant, key, rec, reason, now, lease, cfg)
  local sid = redis.call('ZRANGE', cp .. 'c' .. cls .. ':' .. tenant, 0, 0)[1]
  local spec = ready_head(cp, sid)
  local ok, wake = quota_gate(cp, { rps = cfg.rps, tps = cfg.tps, burst = cfg.burst, cap = cfg.cap },
    tokens_left(spec), spec.a == 0, now)
  if not ok then return false, wake end
  preempt(cp, key, rec, now, lease, reason, true)
  remove_ready(cp, sid, tenant, cls, spec.dl)
  return true, start_run(cp, cls, tenant, vtc_get(cp, tenant), spec, rec.w, cfg, now, lease)
end

-- Fair-share preemption in class `cls` (see above). Returns handed (a run was stopped and its slot
-- handed over), ran (the taker's run started in it; if its request turned out to have ended, the
-- slot's ticket is back in the idle list). The candidate victims (fair_victims) are tried heaviest
-- first: one with no taker (no waiting tenant would hold no more per weight after the swap), or whose
-- runs of the class are all immune (pinned, at their max preemptions), is passed over for the next. One
-- whose runs of the class are inside their min-run quantum is waited for (the group is woken then):
-- a lighter tenant is not stopped in its place.
-- Cost, bounded: fair_victims (at most 1 + 2 x VICTIMS commands), then per victim a taker_for (a ZRANGE,
-- a weight and a ZSCORE for each of at most TAKERS tenants, a counter: at most 2 + 2 x TAKERS), so at
-- most 9 + 4 x 10 = 49 commands before any run is paged (12 with the heaviest tenant alone); the runs
-- paged are the victims' runs of the class, each looked at once in the whole walk (distinct tenants):
-- no more than the class holds, as with one victim.
local function hand_over(cp, cls, cfg, now, lease)
  local pol = policy(cp)
  if pol.fsp == 0 or pol.max_pre == 0 then return false end
  for _, victim in ipairs(fair_victims(cp, cls)) do -- empty, the cheap exit: nothing runs in the class
    local victim_tenant, victim_share = victim[1], victim[2]
    local tenant = taker_for(cp, cls, victim_tenant, victim_share)
    if tenant then
      local runs = cp .. 'rt:' .. victim_tenant
      local soonest = nil -- the earliest end of a min-run quantum among the runs passed over
      -- its runs of this class, most recently started first (the least work lost), 16 at a time: immune
      -- runs (pinned, at their max preemptions) may come first, and each of them is looked at
      local offset = 0
      repeat
        local page = redis.call('ZRANGEBYSCORE', runs, cls * RANK, (cls + 1) * RANK - 1, 'LIMIT', offset, 16)
        for _, key in ipairs(page) do
          local rec = run_record(cp, key)
          local ok, ripe = preemptible(cp, key, rec, pol, now)
          if ok and slot_can_pass(cp, key, rec) then
            local swapped, result = swap(cp, cls, tenant, key, rec, 'fair_share', now, lease, cfg)
            if not swapped then return false end -- the rate quotas hold it back
            return true, result
          elseif not ok and ripe and (not soonest or ripe < soonest) then -- inside its quantum (a run on a
            soonest = ripe                                                -- gone worker is skipped, not waited for)
          end
        end
        offset = offset + 16
      until #page < 16
      if soonest then -- the sweep tries again then
        note_wake(cp, soonest)
        return false
      end
    end
  end
  return false
end

-- Are enough slots being freed (pre: cancelled runs, and priority stops under a max_concurrency cap, whose
-- workers have not let go yet) for every request
-- waiting in class `cls` or above? Those slots go to them first (the highest class dispatches first).
local function being_freed(cp, cls, now)
  redis.call('ZREMRANGEBYSCORE', cp .. 'pre', '-inf', now)
  local pending = redis.call('ZCARD', cp .. 'pre')
  if pending == 0 then return false end
  local counts = redis.call('HGETALL', cp .. 'cn')
  for i = 1, #counts, 2 do
    if tonumber(counts[i]) >= cls then pending = pending - tonumber(counts[i + 1]) end
  end
  return pending >= 0
end

local WINDOW = 32 -- running runs read at a time by preempt_for, lowest-ranked first

-- The stopped run's slot goes to the request the decision picks in class `top` (swap). Its rate quotas are
-- asked there too: the dispatch asked them of the request at the top of the ready set, and with an aged one
-- there (class 10) that was another request. Returns preempt_for's waits, handed, ran.
local function hand_to_waiting(cp, top, key, rec, now, lease, cfg)
  local swapped, result = swap(cp, top, pick_tenant(cp, top), key, rec, 'priority', now, lease, cfg)
  if swapped then return false, true, result end -- result: the request started
  if result then note_wake(cp, result) end -- held back by the rate quotas: result is when they admit it
  return true
end

-- Priority preemption for waiting class `top` (see above): the lowest-ranked preemptible run below the
-- class stops, and its slot goes at once to the request the decision picks in class `top`
-- (hand_to_waiting). Returns `waits`, `handed`, `ran`: waits, the decision stops here (a victim inside its
-- min-run quantum: the group is woken when the quantum ends; the slots being freed, pre, cover every
-- request waiting above the victims; the rate quota holds the picked request back: woken when it admits);
-- handed, a run stopped and its slot went to the waiting request; ran, that request started in it (if it
-- turned out to have ended, the slot's ticket is back in the idle list). All false: no run ranks below
-- the class, and fair share may be asked.
-- With a max_concurrency cap (`cfg.mc`) a stopped run counts as in flight until its worker lets go
-- (quotas.lua in_flight: the cap bounds what the engines run at once), so there the slot is not handed
-- over: the stop frees it when the worker lets go, and as many runs stop as requests of a higher class
-- wait beyond the slots that will be free once those being freed (pre) let go: the fewer of the slots
-- being freed and of the cap less the runs left running. A cap lowered below the runs in flight thus stops
-- at once as many lower-class runs as the waiting need (running - cap + 1 for one request), lowest class
-- first; a later decision counts those stops (out of the running set, in pre) and stops no more. None stops
-- when the runs of the waiting class or above fill the cap (or it is 0): no stop below would let the
-- request start, and each stop's release would stop the next one until every lower-class run was down.
-- For the same reason the stops are chosen first and made only if they open a slot once their workers let
-- go (counting the runs inside their min-run quantum, stopped when it ends): runs below the class that no
-- stop can take (pinned, at their max preemptions, their slot unable to pass) may fill the cap too.
local function preempt_for(cp, top, now, lease, cfg)
  -- The lowest-ranked runs first: most decisions end here, when none ranks below the waiting class.
  local victims = redis.call('ZRANGE', cp .. 'run', 0, WINDOW - 1, 'WITHSCORES')
  if #victims == 0 or math.floor(tonumber(victims[2]) / RANK) >= math.min(top, 9) then return false end
  if top > 9 then
    top = tonumber(redis.call('ZREVRANGEBYSCORE', cp .. 'cls', 9, '-inf', 'LIMIT', 0, 1)[1])
    if not top then return false end
  end
  local pol = policy(cp)
  redis.call('ZREMRANGEBYSCORE', cp .. 'pre', '-inf', now)
  local pending = redis.call('ZCARD', cp .. 'pre')
  local waiting = {}
  local counts = redis.call('HGETALL', cp .. 'cn')
  for i = 1, #counts, 2 do waiting[tonumber(counts[i])] = tonumber(counts[i + 1]) end
  -- Window after window, until the class bound or the runs run out: immune runs (pinned, at their max
  -- preemptions) may fill a window, and a preemptible run ranked after them is still a victim.
  local cap = cfg.mc
  local quantum_cls, found, offset = nil, false, 0
  local running, kept -- with a cap: the runs in the running set, and those of the class or above (not victims)
  if cap then
    running = redis.call('ZCARD', cp .. 'run')
    kept = redis.call('ZCOUNT', cp .. 'run', top * RANK, '+inf')
  end
  local stops, later = {}, 0 -- under a cap: the runs chosen to stop, and those to stop once their quantum ends
  -- The decision's answer (waits), the chosen stops made first if they open a slot (`running` already
  -- counts them out); else none is made, as none would let a waiting request start.
  local function settle(waits)
    if #stops == 0 then return waits end
    if running - later >= cap then return found end
    for _, stop in ipairs(stops) do preempt(cp, stop[1], stop[2], now, lease, 'priority', false) end
    return true
  end
  while true do
    for i = 1, #victims, 2 do
      local vcls = math.floor(tonumber(victims[i + 1]) / RANK)
      if vcls >= top or (quantum_cls and vcls > quantum_cls) then return settle(found) end
      local above = 0
      for c = vcls + 1, 9 do above = above + (waiting[c] or 0) end
      -- the slots free once those being freed let go: under a cap, no more than it leaves the runs left
      local freed = cap and math.min(pending, cap - running) or pending
      if above <= freed then return settle(true) end -- the slots being freed cover those waiting above
      if cap and kept >= cap then return found end -- no stop below the class would let the waiting start
      local rec = run_record(cp, victims[i])
      local ok, ripe = preemptible(cp, victims[i], rec, pol, now)
      if ok and slot_can_pass(cp, victims[i], rec) then
        if not cap then return hand_to_waiting(cp, top, victims[i], rec, now, lease, cfg) end
        stops[#stops + 1] = { victims[i], rec }
        pending, running = pending + 1, running - 1
      elseif not ok and ripe then
        quantum_cls, found = quantum_cls or vcls, true
        later = later + 1
        note_wake(cp, ripe)
      end
    end
    if #victims < 2 * WINDOW then return settle(found) end
    offset = offset + WINDOW
    victims = redis.call('ZRANGE', cp .. 'run', offset, offset + WINDOW - 1, 'WITHSCORES')
  end
end
