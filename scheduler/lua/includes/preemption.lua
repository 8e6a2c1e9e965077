-- preemption.lua: stop the lowest-ranked running requests (lowest class, then most recently
-- started) while more requests of a higher class wait than slots are already being freed (pre).
-- Aged requests (class 10) never preempt, but the real classes waiting below them still do.
-- Anti-thrash: a run that used up its max preemptions is immune and skipped, and so is a run that
-- streamed a tool-call delta (pin.lua: it could not be resumed faithfully); a run inside its
-- min-run quantum is passed over only for an older run of its own class, never for a higher
-- class: the group is woken when the quantum ends and the victim is taken then.

-- Preempt one run: its request goes back to the head of its session's turn at once. On one server
-- the data plane is fenced in the same call (the `preempted` event, the accounting); on a cluster
-- the worker's hand-back does that, and its run record stays until then (flag rq: requeued).
local function preempt(cp, key, rec, now, lease)
  stop_run(cp, key, rec, now, lease, 'priority')
  rec.pc = (rec.pc or 0) + 1
  local spec = spec_of(rec)
  if single_server then
    local _, _, produced, fresh = d_stop(rec.rid, tostring(rec.a), rec.w, 'priority')
    end_run(cp, key, rec, produced, now)
    if fresh then spec = spec_of(rec, fresh) end
  else
    rec.rq = 1
    redis.call('HSET', cp .. 'ri', key, cjson.encode(rec))
  end
  requeue_ready(cp, spec, now)
end

local function preempt_for(cp, top, now, lease)
  -- The lowest-ranked runs first: most decisions end here, when none ranks below the waiting class.
  local victims = redis.call('ZRANGE', cp .. 'run', 0, 31, 'WITHSCORES')
  if #victims == 0 or math.floor(tonumber(victims[2]) / RANK) >= math.min(top, 9) then return end
  if top > 9 then
    top = tonumber(redis.call('ZREVRANGEBYSCORE', cp .. 'cls', 9, '-inf', 'LIMIT', 0, 1)[1])
    if not top then return end
  end
  local pol = policy(cp)
  redis.call('ZREMRANGEBYSCORE', cp .. 'pre', '-inf', now)
  local pending = redis.call('ZCARD', cp .. 'pre')
  local waiting = {}
  local counts = redis.call('HGETALL', cp .. 'cn')
  for i = 1, #counts, 2 do waiting[tonumber(counts[i])] = tonumber(counts[i + 1]) end
  local quantum_cls = nil
  for i = 1, #victims, 2 do
    local vcls = math.floor(tonumber(victims[i + 1]) / RANK)
    if vcls >= top or (quantum_cls and vcls > quantum_cls) then return end
    local above = 0
    for c = vcls + 1, 9 do above = above + (waiting[c] or 0) end
    if above <= pending then return end
    local rec = run_record(cp, victims[i])
    if rec and (rec.pc or 0) < pol.max_pre and redis.call('SISMEMBER', cp .. 'pin', victims[i]) == 0 then
      local ripe = rec.ds + pol.min_run
      if now >= ripe then
        preempt(cp, victims[i], rec, now, lease)
        pending = pending + 1
      else
        quantum_cls = quantum_cls or vcls
        note_wake(cp, ripe)
      end
    end
  end
end
