-- dispatch.lua: the scheduling decision. Highest class, then the backlogged tenant with the least
-- virtual token counter, then that tenant's oldest ready session; gated by the group's quota; into
-- a free slot (a ticket), the group's last few only for a tenant below the one furthest above its
-- share (the headroom); with none free, into the slot of a run of a lower class (it stops), else into
-- the slot of a tenant above its fair share of the running slots (same class) (preemption.lua).

-- No free slot for class `cls`: true when a running request stopped and handed its slot over (decide
-- again; `ran`: a run started in it); false when the decision stops here (a victim inside its min-run
-- quantum, or slots being freed). Priority first: the lowest-ranked run stops, and a same-class run is
-- taken for fair share only when no run below the class may stop for it, nor is a slot being freed
-- (being_freed). `share`: see dispatch.
local function without_free_slot(cp, cls, cfg, now, lease, share)
  local waits, handed, ran = preempt_for(cp, cls, now, lease, cfg)
  if handed then return true, ran end
  if waits or not share or being_freed(cp, cls, now) then return false, false end
  return hand_over(cp, cls, cfg, now, lease)
end

-- Headroom (policy fsr): while a running tenant is a slot or more below a tenant it could take a slot
-- from by fair share (one of fair_victims, heaviest first, see hand_over), the group's last fsr x slots go
-- only to tenants that could: the one below starts in one at once, where it would otherwise preempt (a stop,
-- a hand-back and a restart later, on the way to its first token). The victims are those of the lowest
-- running class: a later arrival of a higher class preempts by priority, one of a lower class preempts
-- nobody; so work of a class below every run is held back as the flooder's of the lowest class is. Not
-- kept: for work of a class above a running run (it could preempt that run), when no slot is free (then
-- preemption decides), or when no tenant is below a victim (one tenant alone, or all at their shares:
-- every slot may be used). Nor is it given to a tenant heavy only by runs of a higher class: when the
-- lightest could take from none of those victims, the heaviest overall, if it holds no run of the class
-- (fair_victims passed it over), is the victim once the lightest could take a slot from it after it started
-- one here (it would then hold ro + 1/w): it would start and at once be preempted by fair share, so it is
-- held back, and a taker must stay within its ro (not ro - 1/w, the test for a tenant that runs there: one
-- slot closer to the lightest, its start would already be undone).
-- `holding`: the caller holds a ticket already. Returns nil when no headroom is kept here, else the
-- victims, heaviest first ({ tenant, the share a taker must stay within (could_take) }).
-- Cost: outside the last fsr slots, 2 reads (LLEN, HLEN); inside them at most 20 more: ZRANGE run, ZRANGE
-- ro, fair_victims (at most 9), a could_take (2) for each of its victims but the lightest (at most 8), and
-- when none is kept the ZREVRANGE of the heaviest overall, with a could_take when it holds no run of the
-- class (fair_victims then kept at most 3: 19 in all); 9 with one flooder and one calm tenant. Then the
-- taker: dispatch's headroom_taker at most 4 taker_for (4 x 10, see hand_over; 10 for the heaviest
-- overall), start_alone's may_take_headroom at most 4 could_take (8): at most 59 and 27 commands.
local function headroom(cp, cls, holding)
  local fraction = policy(cp).fsr
  if fraction <= 0 then return nil end
  local after = redis.call('LLEN', cp .. 'idle') - (holding and 0 or 1) -- free slots once this one is taken
  if after < 0 then return nil end
  -- the group's slots: those held by attempts (tk) and the free ones (the epsilon: 0.29 * 100 < 29)
  if after >= math.floor(fraction * (redis.call('HLEN', cp .. 'tk') + after + 1) + 1e-9) then return nil end
  local lowest_run = redis.call('ZRANGE', cp .. 'run', 0, 0, 'WITHSCORES')[2]
  if not lowest_run then return nil end
  local lowest_cls = math.floor(tonumber(lowest_run) / RANK)
  if tonumber(cls) > lowest_cls then return nil end
  local lightest = redis.call('ZRANGE', cp .. 'ro', 0, 0)[1]
  local holders = fair_victims(cp, lowest_cls)
  local victims = {}
  for _, victim in ipairs(holders) do
    if lightest ~= victim[1] and could_take(cp, lightest, victim[2]) then victims[#victims + 1] = victim end
  end
  if #victims == 0 then
    local heaviest = redis.call('ZREVRANGE', cp .. 'ro', 0, 0, 'WITHSCORES')
    local share = tonumber(heaviest[2])
    if not heaviest[1] or heaviest[1] == lightest or (holders[1] and holders[1][1] == heaviest[1])
        or not could_take(cp, lightest, share) then
      return nil
    end
    victims[1] = { heaviest[1], share }
  end
  return victims
end

-- The tenant waiting in class `cls` that takes a headroom slot (see headroom): the taker for the first of
-- `victims` that has one (taker_for); nil when none of those waiting could take from any of them.
local function headroom_taker(cp, cls, victims)
  for _, victim in ipairs(victims) do
    local tenant, counter = taker_for(cp, cls, victim[1], victim[2])
    if tenant then return tenant, counter end
  end
  return nil
end

-- May `tenant` start in a headroom slot: could it take a slot from one of `victims` (see headroom)?
local function may_take_headroom(cp, tenant, victims)
  for _, victim in ipairs(victims) do
    if tenant ~= victim[1] and could_take(cp, tenant, victim[2]) then return true end
  end
  return false
end

-- One call dispatches at most this many rounds (a round starts a request or preempts for one), so that a
-- worker registering 256 free slots does not hold the server for one long call; what is left wakes the
-- group's scheduler at once (note_wake: its hint), whose sweep goes on in calls of the same size.
local DISPATCH_ROUNDS = 64

-- `share`: try fair-share preemption when no slot is free. Asked where waiting work appears (a request
-- becomes ready) and on the sweep (a victim's min-run quantum ended), not when a slot frees: that
-- slot goes by the fair order anyway, and a saturated group's every release would pay for the check.
local function dispatch(cp, now, lease, share)
  local started = 0
  local cfg = quota_config(cp)
  -- With no rate quota to consult, a free slot is all a request waits for: take the ticket first,
  -- and with none (the common case under load) skip the tenant/session/request lookup.
  local ticket_first = not (cfg.rps or cfg.tps)
  for round = 1, DISPATCH_ROUNDS + 1 do
    local top = redis.call('ZREVRANGE', cp .. 'cls', 0, 0)[1]
    if not top then break end
    if round > DISPATCH_ROUNDS then -- work left over: the scheduler sweeps again at once, not on its timer
      note_wake(cp, now)
      break
    end
    local wid = ticket_first and take_ticket(cp)
    if ticket_first and not wid then
      local handed, ran = without_free_slot(cp, tonumber(top), cfg, now, lease, share)
      if not handed then break end
      if ran then started = started + 1 end
    else
      local tenant, counter
      local victims = headroom(cp, top, wid)
      if victims then
        tenant, counter = headroom_taker(cp, tonumber(top), victims)
        if not tenant then -- none of those waiting in this class may have the headroom: it stays free
          if wid then redis.call('RPUSH', cp .. 'idle', wid) end
          break
        end
      else
        tenant, counter = pick_tenant(cp, top)
      end
      local sid = redis.call('ZRANGE', cp .. 'c' .. top .. ':' .. tenant, 0, 0)[1]
      local spec = ready_head(cp, sid)
      local ok, wake, why = quota_gate(cp, cfg, tokens_left(spec), spec.a == 0, now)
      if not ok then
        if wid then redis.call('RPUSH', cp .. 'idle', wid) end -- the ticket goes back where it was
        redis.call('HSET', cp .. 'qs', 'throttled', why, 'throttled_at', now)
        count(cmetrics(cp), 'throttled', spec.g .. '|' .. why) -- sluicegate_quota_throttled_total
        -- qwake: when the quota admits next, for the operator's view (scheduler/admin.py); wake also
        -- serves preemptions' waits, which are no throttle
        if wake then redis.call('HSET', cp .. 'qs', 'qwake', wake) note_wake(cp, wake) break end
        -- max_concurrency: the runs in flight are the slots here; as with no free slot (a swap, for
        -- priority or fair share, keeps them; as many as the waiting need while they are above the cap:
        -- preempt_for)
        local handed, ran = without_free_slot(cp, tonumber(top), cfg, now, lease, share)
        if not handed then break end
        if ran then started = started + 1 end
      else
        wid = wid or take_ticket(cp)
        if wid then
          remove_ready(cp, sid, tenant, top, spec.dl)
          if start_run(cp, tonumber(top), tenant, counter, spec, wid, cfg, now, lease) then started = started + 1 end
        else
          local handed, ran = without_free_slot(cp, tonumber(top), cfg, now, lease, share)
          if not handed then break end
          if ran then started = started + 1 end
        end
      end
    end
  end
  return started
end

-- A request that becomes ready while nothing else in its group is ready is the decision's only
-- candidate: start it at once when the quota and a free slot allow, without passing through the
-- ready set (about twenty commands saved on the way to its first token). Its tenant returns from
-- idle: as in make_ready, its counter is lifted to the last dispatched counter (no tenant is
-- backlogged). Returns false, having taken no slot, when the decision must go the usual way.
local function start_alone(cp, spec, now, lease)
  if redis.call('EXISTS', cp .. 'cls') == 1 then return false end
  local cfg = quota_config(cp)
  if not quota_gate(cp, cfg, tokens_left(spec), spec.a == 0, now) then return false end
  local wid = take_ticket(cp)
  if not wid then return false end
  local victims = headroom(cp, spec.ep, true)
  if victims and not may_take_headroom(cp, spec.tn, victims) then
    redis.call('RPUSH', cp .. 'idle', wid)
    return false
  end
  local counter = math.max(vtc_get(cp, spec.tn), tonumber(redis.call('GET', cp .. 'vlast') or '0'))
  return start_run(cp, spec.ep, spec.tn, counter, spec, wid, cfg, now, lease)
end

-- Make a session's head request ready in its group (and dispatch). Idempotent, as the repair pass
-- may repeat it: a head already waiting or already dispatched is left alone ('known'); a different
-- head waiting for the same session (its request ended without the control step) is replaced, unless
-- it is later in the session's queue ('stale', see below).
-- `fresh`: the request was stored in this same call (submit_one): no attempt of it can have a run record
-- (one exists only while the request does), and see start_alone.
local function ready(cp, spec, now, lease, fresh)
  local current = ready_head(cp, spec.sid)
  if current then
    if current.rid == spec.rid then return 'known' end
    -- A session's requests are queued in the order of their `queued` events (fs): a late ready of
    -- an earlier head (the session has moved on since) never takes the place of a later one. But fs
    -- orders one life of a session only: once its meta expired (session_ttl idle) its ids start again
    -- at 1, and a waiting entry left from its old life (a cancel or expiry whose control step was lost)
    -- would answer every head of the new one 'stale', for ever. A head with a smaller fs that was
    -- submitted later (`sub`, the data master's clock, at least session_ttl after anything of the old
    -- life) is the new life's: the old entry is replaced. Within one life an earlier head was never
    -- submitted later, short of that master's clock going back; should it, it is readied as before fs
    -- (its start is refused and the real head goes to the outbox).
    local sub, current_sub = tonumber(spec.sub), tonumber(current.sub)
    local new_life = sub and current_sub and sub > current_sub
    if (tonumber(spec.fs) or 0) < (tonumber(current.fs) or 0) and not new_life then return 'stale' end
    remove_ready(cp, spec.sid, current.tn, current.ep, current.dl)
  end
  if not fresh and redis.call('HEXISTS', cp .. 'ri', spec.rid .. '|' .. (spec.a + 1)) == 1 then return 'known' end
  -- a "fail" deadline noted while it waited behind the head (dlq) is the ready set's now (dld, or its run's)
  if spec.dm and not fresh then redis.call('ZREM', cp .. 'dlq', spec.rid .. '|' .. spec.sid) end
  spec.rs = spec.rs or now -- its ready time, kept if it is requeued (FIFO among its tenant's sessions)
  if start_alone(cp, spec, now, lease) then return 'started' end
  make_ready(cp, spec, now)
  dispatch(cp, now, lease, true)
  return 'ready'
end

-- A worker lets go of a run and, when asked, gives its slot's ticket back; then the freed slot is
-- filled. An attempt gives its slot back once (tk: the slots attempts hold), however often a lost
-- reply makes the worker repeat the call, and attempts are not released in order. `slot`: "1" the
-- ticket comes back, "0" the attempt's slot is let go without one (the worker is leaving), "keep"
-- the slot stays with the worker (the sweep closing the run of a worker that may only be paused: it
-- rejoins counting the run as held, and gets the ticket when it lets go of it). `next_head`
-- (one server: the session's next request, from the same call's finish) is readied after the
-- release, so that no decision sees the ended run as running (it could preempt it), and after the
-- ticket, so that it can take the freed slot. `prompt`: see end_run. Returns the number of requests
-- dispatched.
local function let_go(cp, key, wid, produced, requeue, slot, now, lease, next_head, prompt)
  release(cp, key, produced, requeue, now, prompt)
  if slot ~= 'keep' and redis.call('HDEL', cp .. 'tk', key) == 1 and slot == '1' then return_ticket(cp, wid) end
  if next_head then ready(gpre(next_head.g), next_head, now, lease) end
  return dispatch(cp, now, lease)
end

-- Withdraw a cancelled request from its group: out of the ready set, or its run stopped (the
-- worker is told; its slot counts as in use until it lets go).
local function withdraw(cp, rid, attempt, sid, produced, now, lease)
  local key = rid .. '|' .. attempt
  local rec = run_record(cp, key)
  if rec then
    if redis.call('ZSCORE', cp .. 'run', key) then stop_run(cp, key, rec, now, lease, 'cancelled') end
    if single_server then
      end_run(cp, key, rec, produced, now)
    else
      rec.cx = 1
      redis.call('HSET', cp .. 'ri', key, cjson.encode(rec))
    end
  end
  local waiting = ready_head(cp, sid)
  if waiting and waiting.rid == rid then remove_ready(cp, sid, waiting.tn, waiting.ep, waiting.dl) end
end
