-- requests.lua: the data plane's transitions of a request and its session (everything here touches
-- one bucket's keys: the request hash, its input, its session's queue, meta and log). Each returns
-- what the control plane needs next, as a plain table (a "ready spec" or a produced-token count);
-- a single-server function hands it on in the same call, a cluster caller in the next call.

-- What the control plane ranks, charges and starts a waiting head request by.
-- `dl`: its deadline (ms; the time-to-first-token objective), `dm`: 1 when a missed deadline fails it.
-- A deadline binds until the first token (`ft`): a request resumed after it is ranked without one, and at
-- its own class again if the deadline's boost (sweep.lua) raised it.
-- `a`: the last attempt either plane has used up: one the control plane closed before it started here
-- (`fa`, d_stop) counts, or a late ready (the repair pass) would dispatch that attempt again beside the
-- next one already in flight (dispatch.lua ready's run check looks at attempt a+1).
local SPEC_FIELDS = { 'sid', 'tn', 'g', 'p', 'ep', 'mt', 'n', 'a', 'it', 'sub', 'pc', 'fs', 'dl', 'dm', 'ft', 'fa', 'mx' }
local function ready_spec(rid)
  local v = redis.call('HMGET', kreq(rid), unpack(SPEC_FIELDS))
  if not v[1] then return nil end
  local p, ep, first_token = tonumber(v[4]), tonumber(v[5]), v[15]
  -- after its first token, a class a deadline boost gave it (below aging's 10, the only other raise) goes
  -- with the deadline: its hash's ep (effective_priority) shows its own class again
  if first_token and ep < 10 and ep ~= p then
    ep = p
    redis.call('HSET', kreq(rid), 'ep', p)
  end
  return { rid = rid, sid = v[1], tn = v[2], g = v[3], p = p, ep = ep,
    mt = tonumber(v[6]), n = tonumber(v[7]), a = math.max(tonumber(v[8]), tonumber(v[16] or '0')),
    it = tonumber(v[9]), sub = tonumber(v[10]),
    pc = tonumber(v[11] or '0'), fs = tonumber(v[12]),
    -- a deadline binds until the first token: a request resumed after it is ranked without one
    dl = not v[15] and tonumber(v[13] or '') or nil, dm = (not v[15] and v[14] == '1') and 1 or nil,
    mx = not v[15] and tonumber(v[17] or '') or nil }
end

-- Load the listed fields of a request into a table (nil fields stay nil).
local function load(rid, names)
  local values = redis.call('HMGET', kreq(rid), unpack(names))
  local r = {}
  for i, name in ipairs(names) do r[name] = values[i] end
  return r
end

-- The queue depth gauge (sluicegate_queue_depth) counts a request while the data plane has it waiting:
-- from its submit, and from each stop that puts it back (d_preempted), until it starts (d_start) or
-- ends without running (finalize). One plane counts, by the request's own status: on a cluster the
-- control plane's steps lag the data plane's (a dispatch not yet started, a preemption not yet handed
-- back), and a count split between them took a request off twice, or never, when a cancel came between.
local function count_waiting(rid, r, by)
  count(dpre_of(rid) .. 'm', 'depth', r.g .. '|' .. r.p .. '|' .. r.tn, by)
end

-- A head that d_submit stored for submit_one to start at once is counted waiting only when it did not
-- start in the call (two commands fewer on the first token's way than a count and its take-back).
local function uncounted(rid) return 'uncounted:' .. rid end -- its per_call mark
local function count_if_not_started(spec)
  if per_call[uncounted(spec.rid)] then count_waiting(spec.rid, spec, 1) end
end

-- A head request that waits to be made ready on the control plane. On a cluster that is the next
-- call, so the head is noted in the bucket's outbox first: if the caller dies in between, the
-- repair pass (scheduler) finds it there. A single-server call readies it in the same call.
-- `known`: its ready spec when the caller has it already (d_submit, from the values it just stored).
local function head_waiting(rid, now, via_outbox, known)
  if via_outbox then redis.call('ZADD', dpre_of(rid) .. 'ob', now, rid) end
  return known or ready_spec(rid)
end

-- The input kind and parameters a request hash leaves out when they are these (most prompts):
-- its readers take an absent ik as 'p' and an absent pa as '{}'.
local DEFAULT_INPUT_KIND, NO_PARAMS = 'p', '{}'

-- Store a new request at the tail of its session's lite queue (creating the session on first use).
-- Returns 'ok', seq of its `queued` event, its ready spec when it is the session's head (nil when it
-- waits behind another request of the session), and for one that waits behind the head with a
-- `"on_deadline_miss": "fail"` deadline that deadline (ms, rounded up), which the caller notes in its
-- group's dlq (the sweep ends it there: only a head is readied, with dld) | 'forbidden', owner |
-- 'ok', seq, nil, that deadline when it still waits behind the head (a replay).
-- `log_max`: the session's log cap (--session-log-max-events; "" = keep the one stored), noted in its
-- meta for every later call that appends to the log (see trim_log in call.lua); the default is not.
-- `deadline_ms`: the time-to-first-token objective from now ("" or 0: none); `on_miss`: "fail" ends the
-- request once it is missed (sweep.lua), anything else lets it run late. `boost_cap`: the highest class
-- a deadline may raise it to, its tenant's max_priority (nil or "": any), kept as `mx`.
local function d_submit(dp, rid, sid, tenant, group, prio, max_tokens, input, kind, params, input_tokens, owner,
                        now, via_outbox, log_max, deadline_ms, on_miss, boost_cap)
  local rkey = kreq(rid)
  -- Request ids are 72 random bits: an existing one is this very submission, replayed by a client
  -- retry after a lost reply. Answer as the first time did, without storing it twice.
  -- (Its deadline is answered again: the caller whose first reply was lost has not noted it in dlq.)
  if redis.call('EXISTS', rkey) == 1 then
    local kept = redis.call('HMGET', rkey, 'fs', 'dm', 'dl', 'st', 'sid')
    local behind = kept[2] == '1' and kept[4] == 'queued' and redis.call('LINDEX', kqueue(dp, kept[5]), 0) ~= rid
    return 'ok', kept[1], nil, behind and math.ceil(tonumber(kept[3])) or nil
  end
  local meta = kmeta(dp, sid)
  -- A meta with ids but no owner (only `sluicegate migrate` writes one) is not new: it keeps its ids,
  -- its boot check and its TTL handling, and takes this tenant as its owner. The same read serves the
  -- boot check of the ids this call takes (log_ids.lua check_boot).
  local stored = redis.call('HMGET', meta, 'tn', 'seq', 'bt', 'lm')
  local stored_owner, stored_cap = stored[1], stored[4]
  local new_meta = not stored_owner and not stored[2]
  if owner ~= '' and stored_owner and stored_owner ~= owner then return 'forbidden', stored_owner, nil end
  -- the default log cap is the absent one (call.lua trim_log): not stored, and a cap stored by a process
  -- with another setting is removed
  local log_cap = log_max and log_max ~= '' and tonumber(log_max) ~= LOG_MAX_EVENTS and log_max
  if new_meta then
    create_meta(meta, tenant, log_cap)
  else
    if not stored_owner then redis.call('HSET', meta, 'tn', tenant) end
    if log_cap then
      if log_cap ~= stored_cap then redis.call('HSET', meta, 'lm', log_cap) end
      stored_cap = log_cap
    elseif log_max and log_max ~= '' and stored_cap then
      redis.call('HDEL', meta, 'lm')
      stored_cap = nil
    end
    check_boot(meta, stored[3], stored[2], stored_cap)
  end
  local position = redis.call('RPUSH', kqueue(dp, sid), rid)
  if position == 1 then -- the session was idle, so its meta (unless new: just made) and log had a TTL
    if not new_meta then redis.call('PERSIST', meta) end
    redis.call('PERSIST', klog(dp, sid))
  end
  -- Its data names no request_id: the entry's own rid field does, and readers put it back in
  -- (sessions/events.py). Stored once per queued request, that saves ~48 bytes of each.
  local seq = emit(dp, sid, 'queued', rid, { priority = tonumber(prio), position = position - 1 })
  local fields = { 'sid', sid, 'tn', tenant, 'g', group, 'p', prio, 'ep', prio, 'mt', max_tokens,
    'it', input_tokens, 'st', 'queued', 'sub', now, 'n', 0, 'a', 0, 'fs', seq }
  -- A prompt (ik p) without parameters is left at the readers' defaults (sessions/runs.py), unstored.
  if kind ~= DEFAULT_INPUT_KIND then fields[#fields + 1], fields[#fields + 2] = 'ik', kind end
  if params ~= NO_PARAMS then fields[#fields + 1], fields[#fields + 2] = 'pa', params end
  local objective = tonumber(deadline_ms or '') or 0
  local cap = objective > 0 and tonumber(boost_cap or '') or nil
  if objective > 0 then
    fields[#fields + 1], fields[#fields + 2] = 'dl', now + objective
    fields[#fields + 1], fields[#fields + 2] = 'dm', on_miss == 'fail' and '1' or '0'
    if cap then fields[#fields + 1], fields[#fields + 2] = 'mx', cap end
  end
  redis.call('HSET', rkey, unpack(fields))
  redis.call('SET', kinput(rid), input)
  if position == 1 and not via_outbox then -- it may start in this same call (submit_one): d_start takes these, unread
    per_call[uncounted(rid)] = true
    per_call[rkey] = { st = 'queued', a = '0', n = '0', sid = sid, g = group, p = prio, tn = tenant, mt = max_tokens,
      ik = kind ~= DEFAULT_INPUT_KIND and kind or nil, pa = params ~= NO_PARAMS and params or nil, input = input }
    if objective > 0 and on_miss == 'fail' then per_call[rkey].dl, per_call[rkey].dm = now + objective, '1' end
  end
  local label = group .. '|' .. prio .. '|' .. tenant
  count(dp .. 'm', 'requests', label .. '|submitted')
  -- A head readied in this same call (submit_one) is counted waiting there, and only if it does not start
  -- at once (count_if_not_started).
  if position ~= 1 or via_outbox then count_waiting(rid, { g = group, p = prio, tn = tenant }, 1) end
  if position ~= 1 then -- behind the head: of its deadline only a `fail` one concerns the control plane (dlq)
    return 'ok', seq, nil, objective > 0 and on_miss == 'fail' and math.ceil(now + objective) or nil
  end
  -- The head's ready spec, as ready_spec would read it back from what was just stored (a new request:
  -- no tokens, attempts, preemptions or first token yet), without reading it back (on the first
  -- token's way). tests/test_ready_specs.py holds the two equal.
  local p = tonumber(prio)
  local spec = { rid = rid, sid = sid, tn = tenant, g = group, p = p, ep = p, mt = tonumber(max_tokens), n = 0, a = 0,
    it = tonumber(input_tokens), sub = now, pc = 0, fs = seq }
  if objective > 0 then spec.dl, spec.dm, spec.mx = now + objective, on_miss == 'fail' and 1 or nil, cap end
  return 'ok', seq, head_waiting(rid, now, via_outbox, spec)
end

-- The run spec a worker needs to (re)start a request: the assignment carries it (saving a read on
-- the way to the first token), from the fields d_start loaded (`r`; with `input` when the call has just
-- stored the request, which then needs no read). An input longer than INLINE_INPUT is left out (`in`
-- absent): the worker reads it from r:<rid>:in. One read at most: at most INLINE_INPUT + 1 bytes come
-- back, and a longer answer means a longer input. RunSpec.from_fields (sessions/runs.py) reads these.
-- `dx`: the ms left (at `now`; 0 or less: passed already) until the request's `"on_deadline_miss": "fail"` deadline,
-- when it has one and no first token yet: the worker stops the run if no first token is written by then.
-- Relative, so that the worker's timer goes by no clock but its own and never fires before the deadline.
local INLINE_INPUT = 8192
local RUN_SPEC_FIELDS = { 'sid', 'g', 'tn', 'p', 'mt', 'n', 'ik', 'pa' }
local function run_spec(rid, r, now)
  local spec = {}
  for _, name in ipairs(RUN_SPEC_FIELDS) do spec[name] = r[name] end
  local input = r.input or redis.call('GETRANGE', kinput(rid), 0, INLINE_INPUT)
  if #input <= INLINE_INPUT then spec['in'] = input end
  if r.dm == '1' and not r.ft then spec.dx = tonumber(r.dl) - now end
  return spec
end

-- The stops that count against --max-preemptions: by a higher class, or for a tenant below its share.
local PREEMPTIONS = { priority = true, fair_share = true }

local function d_preempted(rid, r, reason, detail)
  local dp = dpre_of(rid)
  redis.call('HSET', kreq(rid), 'st', 'preempted')
  count_waiting(rid, r, 1)
  if PREEMPTIONS[reason] then redis.call('HINCRBY', kreq(rid), 'pc', 1) end
  count(dp .. 'm', 'preemptions', r.g .. '|' .. r.p .. '|' .. reason)
  emit(dp, r.sid, 'preempted', rid, { request_id = rid, index = tonumber(r.n), reason = reason, detail = detail })
end

-- Start attempt `attempt` of a dispatched request on worker `wid`: from here on only this attempt
-- may write the request's tokens (the fence every append checks). Refused ('gone') when the request
-- ended or a later attempt already started. An earlier attempt still marked running (on a cluster
-- its hand-back can come after the new start) is fenced here, with its `preempted` event: its reason
-- is `stopped_for` (the control plane's, carried by the assignment) when that names a preemption of
-- the attempt just before this one, else 'superseded'. `resume`: how the worker's engine resumes
-- ("continue" | "regenerate"), said in the `resumed` event. The fenced attempt's token count is kept
-- (fp "attempt:produced"): its late hand-back or finish reconciles its charges with it (produced_by).
-- Returns ok, run spec (see run_spec), previous status.
local START_FIELDS = { 'st', 'a', 'n', 'dn', 'sid', 'g', 'p', 'sa', 'fa', 'tn', 'mt', 'ik', 'pa', 'dl', 'dm', 'ft' }
local function d_start(rid, attempt, wid, now, stopped_for, resume)
  -- the request's fields as this call's d_submit stored them (its input too), else read (and `input` nil)
  local r = per_call[kreq(rid)] or load(rid, START_FIELDS)
  per_call[kreq(rid)] = nil
  -- `fa`: the last attempt the control plane closed before it ever started here (d_stop): too late now
  if not r.st or TERMINAL[r.st] or tonumber(r.a) >= attempt or tonumber(r.fa or '0') >= attempt then
    -- A stale dispatch (on a cluster its ready step may have come late and taken the place of the
    -- session's real head): that head goes to the outbox, so the repair pass readies it again.
    if r.st and TERMINAL[r.st] and not single_server then
      local dp = dpre_of(rid)
      local head = redis.call('LINDEX', kqueue(dp, r.sid), 0)
      local st = head and redis.call('HGET', kreq(head), 'st')
      if st == 'queued' or st == 'preempted' then redis.call('ZADD', dp .. 'ob', now, head) end
    end
    return false, nil, r.st
  end
  if r.st == 'running' then
    local known = PREEMPTIONS[stopped_for] and tonumber(r.a) == attempt - 1
    d_preempted(rid, r, known and stopped_for or 'superseded')
    redis.call('HSET', kreq(rid), 'fp', r.a .. ':' .. (tonumber(r.n) - tonumber(r.dn or r.n)))
  end
  if per_call[uncounted(rid)] then per_call[uncounted(rid)] = nil else count_waiting(rid, r, -1) end
  local first = not r.sa
  redis.call('HSET', kreq(rid), 'st', 'running', 'a', attempt, 'w', wid, 'dn', r.n, 'ds', now,
    first and 'sa' or 'ds', now)
  local dp = dpre_of(rid)
  if not single_server then redis.call('ZREM', dp .. 'ob', rid) end -- one server never notes an outbox
  local data = { request_id = rid, index = tonumber(r.n), attempt = attempt, worker = wid }
  if not first and resume and resume ~= '' then data.resume = resume end
  emit(dp, r.sid, first and 'started' or 'resumed', rid, data)
  return true, run_spec(rid, r, now), r.st
end

-- Remove an ended request from its session queue (`was_head`: it was the queue's head); the next one
-- becomes the head (returned as a ready spec) or, when the session has no work left, its idle TTL starts,
-- also after a request that was in no queue (a stranded one `sluicegate migrate` copied) or not the head.
local function advance(dp, sid, rid, was_head, now, ttl, via_outbox)
  local queue = kqueue(dp, sid)
  redis.call('LREM', queue, 1, rid)
  local next_rid = redis.call('LINDEX', queue, 0)
  if next_rid then -- work still waits (its keys keep no TTL); a new head when this one was the head
    if was_head then return head_waiting(next_rid, now, via_outbox) end
    return nil
  end
  redis.call('EXPIRE', kmeta(dp, sid), ttl)
  redis.call('EXPIRE', klog(dp, sid), ttl)
  return nil
end

-- A deadline missed with no first token, recorded as the first token's append would have judged it
-- (deadline_met false, the metric); `r.dmt` marks it recorded for the rest of the call (finalize).
local function record_miss(rid, r)
  redis.call('HSET', kreq(rid), 'dmt', '0')
  count(dpre_of(rid) .. 'm', 'deadlines', r.g .. '|' .. r.p .. '|missed')
  r.dmt = '0'
end

-- A `"on_deadline_miss": "fail"` deadline missed before the request's first token: it ends failed with an
-- `error` event whose message this gives (`what` came too late: it "starts deadline_exceeded", says the
-- contract), and the miss is recorded as its first token's would have been (deadline_met false, the metric).
-- The caller writes the message as the request's `err` and finalizes it.
local DEADLINE_EXCEEDED = 'deadline_exceeded' -- also the worker's detail for it (sessions/runs.py)
local function deadline_message(r, what)
  return string.format('%s: %s within its deadline of %d ms', DEADLINE_EXCEEDED, what,
    tonumber(r.dl) - tonumber(r.sub))
end
local function deadline_missed(rid, r, what)
  record_miss(rid, r)
  return deadline_message(r, what)
end

-- `r.st`: the status it ends from (a request that was waiting leaves the depth gauge). `data`: the end
-- event's data, a table or its JSON text (d_finish's, which carries the backend's usage as it came).
-- A request that ends, however (failed for its attempts or by its engine, cancelled, done), after its deadline
-- passed (by this clock, `now`) with no first token missed it, whatever its on_deadline_miss: recorded here,
-- once (a `fail` deadline's end recorded it already: deadline_missed), or the late requests that never got a
-- token would count as neither. One that ends before its deadline was never judged (deadline_met null).
-- `r` needs `dl` and `ft` (every caller's fields have them).
local function finalize(rid, r, status, event, data, now, ttl, via_outbox)
  local dp = dpre_of(rid)
  if r.dl and not r.ft and not r.dmt and now > tonumber(r.dl) then record_miss(rid, r) end
  if r.st ~= 'running' then count_waiting(rid, r, -1) end
  redis.call('HSET', kreq(rid), 'st', status, 'fin', now)
  redis.call('EXPIRE', kreq(rid), ttl)
  redis.call('DEL', kinput(rid))
  if not single_server then redis.call('ZREM', dp .. 'ob', rid) end -- one server never notes an outbox
  count(dp .. 'm', 'requests', r.g .. '|' .. r.p .. '|' .. r.tn .. '|' .. status)
  ended(rid, now) -- its callback and its usage (ended.lua)
  local was_head = redis.call('LINDEX', kqueue(dp, r.sid), 0) == rid
  -- A request in no queue (a stranded one `sluicegate migrate` copied: it has no TTL) can outlive its idle
  -- session. Its end event would recreate the expired session's meta and log (the log written when the
  -- call ends, after advance's TTL), owned by no one and never ending; no one can read that session.
  if was_head or redis.call('EXISTS', kmeta(dp, r.sid)) == 1 then
    emit_many(dp, r.sid, { { event, rid, type(data) == 'string' and data or cjson.encode(data) } })
  end
  return advance(dp, r.sid, rid, was_head, now, ttl, via_outbox)
end

local END_FIELDS = { 'st', 'a', 'w', 'n', 'dn', 'sid', 'g', 'tn', 'p', 'it', 'fl', 'fp', 'dl', 'ft' } -- d_cancel's
local function owns(r, attempt, wid)
  return r.st == 'running' and r.a == attempt and (wid == nil or r.w == wid)
end
-- Tokens attempt `attempt` produced: 0 when it never started on the data plane (a dispatch whose
-- start was refused or never came); when a later attempt started, what it had when that start fenced
-- it (fp, d_start), else nil (unknown).
local function produced_by(r, attempt)
  if r.a ~= attempt then
    if (tonumber(r.a) or 0) < tonumber(attempt) then return 0 end
    local fenced, produced = string.match(r.fp or '', '^(%d+):(%d+)$')
    return fenced == tostring(attempt) and tonumber(produced) or nil
  end
  return tonumber(r.n) - tonumber(r.dn or r.n)
end

-- A request that still waits to run (never started this attempt, or stopped already), as a ready spec
-- to requeue; nil once it ended or a later attempt started.
local function still_waiting(rid, r, attempt)
  if r.st and not TERMINAL[r.st] and tonumber(r.a) <= tonumber(attempt) then return ready_spec(rid) end
  return nil
end

-- The session's head when it waits to be readied (queued or preempted), as a ready spec; nil when it runs
-- or the session has none. What a replayed end (below) answers as the session's next head: the first
-- reply's head may have been readied, dispatched or ended since, and readying a waiting head again is what
-- the repair pass does with its outbox entry (the control plane answers "known" or "stale").
local function waiting_head(dp, sid)
  local head = redis.call('LINDEX', kqueue(dp, sid), 0)
  local st = head and redis.call('HGET', kreq(head), 'st')
  if st == 'queued' or st == 'preempted' then return ready_spec(head) end
  return nil
end

-- A run's end on a cluster whose reply was lost (the connection broke after the call landed) is sent again
-- whole by the worker (EndProgress has no reply to take up from), and finds the request ended by that very
-- end: by this attempt on this worker (`r.a`, `r.w`), done (`done`: the end was a done one) or failed with
-- one of the error messages that end writes (`messages`). Nothing else ends a request with this attempt,
-- worker and message: only the end's owner ends it done, and the sweep's ends write their own messages
-- (a lost worker's last attempt: d_stop's message names worker_lost; d_expire's says "not started"). The
-- end's reply then carries what the first one did for the steps after it: the tokens produced (by the
-- backend's count), the backend's prompt count and the session's waiting head; a plain refusal would leave
-- the release without the prompt count, and the next head waiting for the repair pass. It still says
-- "not ended by this call" (0), as a resent end says on one server. Its release on the control plane goes
-- once per run record, so a release that landed already is not repeated. One server ends a run in one call:
-- its resent end only releases, as before (`same_end`, the same test on either: whether its tail, left out,
-- was a fenced write; see append_tail).
local function same_end(rid, r, attempt, wid, done, messages)
  if not wid or r.a ~= attempt or r.w ~= wid then return false end
  if r.st == 'done' then return done end
  if r.st ~= 'failed' or #messages == 0 then return false end
  local err = redis.call('HGET', kreq(rid), 'err')
  for _, message in ipairs(messages) do
    if err == message then return true end
  end
  return false
end
local function ended_by(rid, r, attempt, wid, done, messages)
  return not single_server and same_end(rid, r, attempt, wid, done, messages)
end

-- The usage a `done` reports, as JSON text: the backend's for the whole request when it gave one (`usage`,
-- the worker's JSON text of an object whose counts are sane: sane_count, ended.lua), kept as it came, since
-- cjson's encode would cut its numbers to 14 digits and turn its empty arrays into objects; else
-- Sluicegate's count: the estimated input tokens and the tokens streamed. Then its prompt and completion
-- tokens, and whether it is the backend's.
local function usage_of(r, usage, tokens)
  if usage and usage ~= '' then
    local ok, reported = pcall(cjson.decode, usage)
    if ok and type(reported) == 'table' then
      local prompt, completion = sane_count(reported.prompt_tokens), sane_count(reported.completion_tokens)
      if prompt and completion then return usage, prompt, completion, true end
    end
  end
  local prompt = tonumber(r.it) or 0
  return cjson.encode({ prompt_tokens = prompt, completion_tokens = tokens, total_tokens = prompt + tokens }),
    prompt, tokens, false
end

-- End attempt `attempt` as done or failed. `usage`: the backend's usage for the whole request (JSON
-- text, stored and sent on as it is: usage_of) or nil / "". Returns finished (bool), status, tokens this
-- attempt produced (nil when unknown; by the backend's count when it reported usage), the session's next
-- head (ready spec) if any, (refused: the run was taken away, e.g. a sweep handed it back meanwhile) the
-- request's spec when it still waits, for the release to requeue (whichever of the two releases comes
-- first finds the run record), and the request's real input tokens when the backend reported them.
-- Append token events args[from..] (JSON data, one per token, in index order) for attempt `attempt` of a
-- running request, the first at index `first`; `times` is "took|called|first" (the worker's clock, ms, when
-- it took the run, called its engine and got its first token) with the request's first batch, else "".
-- Returns {1, tokens so far} | {0, status} when fenced | {-1, expected index} on a gap or an overlap |
-- {-2, 'deadline_exceeded'} for a first token past the request's `"on_deadline_miss": "fail"` deadline:
-- nothing is written (the deadline was missed), and the worker ends the run failed for it (d_finish).
-- A batch from index 0 carries the request's first token (ft is written with the count that first goes past
-- 0, and the count never goes back): only it reads what the first token is judged and timed by. Every later
-- batch, most of a run's calls, reads the fence, the count and the log's and metrics' names.
-- `r`: the request's fields when the caller has read them (append_tail, at least FIRST_APPEND_FIELDS); what
-- the append writes of them (`n`, `ft`) is kept in it, so that it reads as the hash does after the call.
local APPEND_FIELDS = { 'st', 'a', 'n', 'sid', 'g', 'tn', 'p' }
local FIRST_APPEND_FIELDS = { 'st', 'a', 'n', 'sid', 'g', 'tn', 'p', 'sub', 'ft', 'dl', 'dm' }
local function d_append(dp, rid, attempt, first, times, args, from, r)
  local first_token = first == 0
  r = r or load(rid, first_token and FIRST_APPEND_FIELDS or APPEND_FIELDS)
  if not owns(r, attempt) then
    count(dp .. 'm', 'fenced', r.g or '?') -- a late write from a worker that lost the run (operators' signal)
    return { 0, r.st or 'missing' }
  end
  if tonumber(r.n) ~= first then return { -1, tonumber(r.n) } end
  first_token = first_token and not r.ft
  if first_token and r.dm == '1' and clock() > tonumber(r.dl) then return { -2, DEADLINE_EXCEEDED } end
  local added = #args - from + 1
  emit_tokens(dp, r.sid, rid, args, from)
  local total = first + added -- its count was `first` (checked above)
  if not first_token then
    redis.call('HSET', kreq(rid), 'n', total)
  else -- the first token: its count, its time and where that went, in one write
    local now = clock()
    local fields = { 'n', total, 'ft', now }
    local took, called, answered = string.match(times, '^(%d+%.?%d*)|(%d+%.?%d*)|(%d+%.?%d*)$')
    if took then -- where the first token's time went in the worker and its engine (GET /v1/requests/{id})
      fields[5], fields[6], fields[7], fields[8], fields[9], fields[10] = 'et', took, 'ec', called, 'ef', answered
    end
    local met = r.dl and now <= tonumber(r.dl) -- the deadline is a time-to-first-token objective: met or missed now
    if r.dl then fields[#fields + 1], fields[#fields + 2] = 'dmt', met and '1' or '0' end
    redis.call('HSET', kreq(rid), unpack(fields))
    r.ft = now
    observe(dp .. 'm', 'ttft', r.g .. '|' .. r.p, (now - tonumber(r.sub)) / 1000)
    if r.dl then count(dp .. 'm', 'deadlines', r.g .. '|' .. r.p .. '|' .. (met and 'met' or 'missed')) end
  end
  count(dp .. 'm', 'tokens', r.g .. '|' .. r.p .. '|' .. r.tn, added)
  r.n = total
  return { 1, total }
end

-- The tokens a run's end carries (its last batch: one call, and one event batch for the readers,
-- instead of an append and then the end), args[from..], appended before it ends; `first` is the index
-- of the first ("" when none). A fenced batch is left out: the end is refused as it would be alone. An
-- overlap that is exactly this batch is a resent end whose first call landed: the end decides. Any
-- other gap cannot come from the run's owner (only it writes): an error, and the run's lease lapses
-- (the request resumes from the tokens in the log) rather than ending with tokens missing.
-- An end resent after its reply was lost (the request ended done by this attempt on worker `wid`) appends
-- nothing and counts no fenced write: no run was lost, the end that landed decides. A request that ended
-- failed with that attempt and worker appends nothing either (`r.tail_held`), and d_finish tells whether that
-- end was this one (same_end: its own message, or its missed `fail` deadline's) or the sweep's (its worker
-- declared lost at --max-attempts), whose worker's late end is a fenced write like any other.
-- Returns the request's FINISH_FIELDS as they are after the append, which the end then reads no more (nil
-- when there was no tail: the end reads them itself).
local FINISH_FIELDS = { 'st', 'a', 'w', 'n', 'dn', 'sid', 'g', 'tn', 'p', 'it', 'fl', 'dl', 'dm', 'ft', 'sub', 'fp' }
local function append_tail(dp, rid, attempt, wid, first, times, args, from)
  if first == '' or from > #args then return nil end
  first = tonumber(first)
  local r = load(rid, FINISH_FIELDS)
  if r.st == 'done' and r.a == attempt and r.w == wid then return r end
  if r.st == 'failed' and r.a == attempt and r.w == wid then
    r.tail_held = true
    return r
  end
  local appended = d_append(dp, rid, attempt, first, times, args, from, r)
  if appended[1] == -1 and appended[2] ~= first + #args - from + 1 then
    error('the run\'s last tokens start at index ' .. first .. ' but the log expects ' .. appended[2], 0)
  end
  return r
end

-- A request with a `"on_deadline_miss": "fail"` deadline and no first token ends failed for it when the
-- worker says so (`detail` DEADLINE_EXCEEDED: its timer stopped the run, or the store refused its first
-- token), or when its run ends done past the deadline without one (its last tokens, which append_tail
-- refused before this: the end is judged as their append was). `r`: the request's FINISH_FIELDS when the
-- caller has them (append_tail's), else read here.
local function d_finish(rid, attempt, wid, outcome, detail, usage, now, ttl, via_outbox, r)
  r = r or load(rid, FINISH_FIELDS)
  if not owns(r, attempt, wid) then
    -- the messages this end writes when it ends the request failed: its own, or a missed `fail` deadline's
    local messages = outcome == 'done' and {} or { detail }
    if r.dm == '1' and not r.ft then messages[#messages + 1] = deadline_message(r, 'no first token') end
    local same = same_end(rid, r, attempt, wid, outcome == 'done', messages)
    -- a tail append_tail held back: a fenced write (as d_append counts one) unless this is that end resent
    if r.tail_held and not same then count(dpre_of(rid) .. 'm', 'fenced', r.g or '?') end
    if same and not single_server then -- a resent end: its first reply's counts
      local produced, prompt = produced_by(r, attempt), nil
      if r.st == 'done' then
        local _, input, output, backends = usage_of(r, usage, tonumber(r.n))
        if backends then produced, prompt = math.max(0, output - tonumber(r.dn or 0)), input end
      end
      return false, r.st, produced, waiting_head(dpre_of(rid), r.sid), nil, prompt
    end
    return false, r.st or 'missing', produced_by(r, attempt), nil, still_waiting(rid, r, attempt)
  end
  if r.dm == '1' and not r.ft
      and ((outcome ~= 'done' and detail == DEADLINE_EXCEEDED) or (outcome == 'done' and now > tonumber(r.dl))) then
    outcome, detail = 'failed', deadline_missed(rid, r, 'no first token')
  end
  local produced, tokens = produced_by(r, attempt), tonumber(r.n)
  local prompt
  local nxt
  if outcome == 'done' then
    local reported, input, output, backends = usage_of(r, usage, tokens)
    if backends then
      produced = math.max(0, output - tonumber(r.dn or 0))
      prompt = input
    end
    redis.call('HSET', kreq(rid), 'fr', detail, 'us', reported)
    -- The usage's text spliced in as it is (usage_of): an encoded object ends in its closing brace.
    local done = cjson.encode({ request_id = rid, tokens = tokens, finish_reason = detail })
    nxt = finalize(rid, r, 'done', 'done', string.sub(done, 1, -2) .. ',"usage":' .. reported .. '}', now, ttl,
      via_outbox)
  else
    redis.call('HSET', kreq(rid), 'err', detail)
    nxt = finalize(rid, r, 'failed', 'error', { request_id = rid, tokens = tokens, message = detail }, now, ttl,
      via_outbox)
  end
  return true, r.st, produced, nxt, nil, prompt
end

-- The stops that count against a request's attempts (--max-attempts): its backend calls failed, or
-- its worker was lost. Preemptions, cancels and graceful hand-backs (shutdown) do not count.
local FAILURES = { backend_error = true, worker_lost = true }

-- The error message of a request that failed its `max_attempts`-th attempt (`failures`), the last for `label`.
local function attempts_message(failures, max_attempts, label, detail)
  return 'failed ' .. failures .. ' attempts (--max-attempts ' .. max_attempts .. '); last: '
    .. label .. (detail and detail ~= '' and (': ' .. detail) or '')
end

-- Stop attempt `attempt` and put its request back to wait (preempted, worker lost or shutting
-- down, backend failed): it resumes from the tokens so far. `reason` is a label ("priority",
-- "worker_lost", ...), optionally followed by ": detail"; only the label reaches metrics (bounded
-- cardinality). A failure (FAILURES) that is the request's `max_attempts`-th ends it instead, as
-- failed, with an `error` event. Returns stopped (bool), status, produced, the ready spec to requeue
-- (nil when it ended), and the session's next head (ready spec) when it ended.
local STOP_FIELDS = { 'st', 'a', 'w', 'n', 'dn', 'sid', 'g', 'tn', 'p', 'it', 'fl', 'fp', 'dl', 'dm', 'ft', 'sub' }
local function d_stop(rid, attempt, wid, reason, max_attempts, now, ttl, via_outbox)
  local r = load(rid, STOP_FIELDS)
  local label, detail = string.match(reason, '^([%w_]+):%s*(.*)$')
  label = label or reason
  if not owns(r, attempt, wid) then -- not ours any more; still waiting: requeue it as it is
    -- a resent hand-back that ended the request (its last allowed attempt): the session's waiting head too
    local ending = FAILURES[label] and max_attempts and r.fl and { attempts_message(r.fl, max_attempts, label, detail) }
      or {}
    if ended_by(rid, r, attempt, wid, false, ending) then
      return false, r.st, produced_by(r, attempt), nil, waiting_head(dpre_of(rid), r.sid)
    end
    if r.st and not TERMINAL[r.st] and tonumber(r.a) < tonumber(attempt) then
      -- Closed before it started (on a cluster: an assignment still in a busy worker's inbox when its
      -- lease lapsed): its late start must be refused, or it would run unseen by the control plane.
      redis.call('HSET', kreq(rid), 'fa', attempt)
    end
    return false, r.st or 'missing', produced_by(r, attempt), still_waiting(rid, r, attempt)
  end
  if FAILURES[label] and max_attempts then
    local failures = redis.call('HINCRBY', kreq(rid), 'fl', 1)
    if failures >= max_attempts then
      local message = attempts_message(failures, max_attempts, label, detail)
      -- Its deadline passed with no first token: a miss too (finalize records it), whatever the attempts'
      -- count says of the end.
      redis.call('HSET', kreq(rid), 'err', message)
      local nxt = finalize(rid, r, 'failed', 'error', { request_id = rid, tokens = tonumber(r.n), message = message },
        now, ttl, via_outbox)
      return true, r.st, produced_by(r, attempt), nil, nxt
    end
  end
  d_preempted(rid, r, label, detail)
  return true, r.st, produced_by(r, attempt), ready_spec(rid)
end

-- End a waiting request whose deadline passed with `"on_deadline_miss": "fail"` (the sweep found it):
-- failed, with an `error` event whose message starts `deadline_exceeded`. Only a request that has not
-- had its first token and is not running (a dispatch that won the race runs it: it started in time).
-- Nothing was charged: charges are taken at dispatch. `behind`: the sweep found it in dlq (submitted
-- behind its session's head): kept once it is the head, whose deadline is dld's (a dispatch may have
-- won). Returns outcome ('expired' | 'kept'), the request's fields, the session's next head.
local function d_expire(rid, now, ttl, via_outbox, behind)
  local r = load(rid, { 'st', 'a', 'n', 'sid', 'g', 'tn', 'p', 'dl', 'dm', 'ft', 'sub' })
  if not r.st or TERMINAL[r.st] or r.st == 'running' or r.ft or r.dm ~= '1' or now < tonumber(r.dl)
      or (behind and redis.call('LINDEX', kqueue(dpre_of(rid), r.sid), 0) == rid) then
    return 'kept', r
  end
  local message = deadline_missed(rid, r, 'not started')
  redis.call('HSET', kreq(rid), 'err', message)
  local nxt = finalize(rid, r, 'failed', 'error', { request_id = rid, tokens = tonumber(r.n), message = message },
    now, ttl, via_outbox)
  return 'expired', r, nxt
end

-- Cancel a queued, preempted or running request (a running one's worker is fenced at its next
-- write). Returns outcome ('cancelled' | 'terminal' | 'missing' | 'forbidden'), the request's
-- fields before, produced by its current attempt, the session's next head.
-- One cancelled after its deadline passed (by this clock, `now`) with no first token missed it, whatever its
-- on_deadline_miss (finalize records it); one cancelled before its deadline was never judged.
local function d_cancel(rid, owner, now, ttl, via_outbox)
  local r = load(rid, END_FIELDS)
  if not r.st then return 'missing', r end
  if owner ~= '' and r.tn ~= owner then return 'forbidden', r end
  if TERMINAL[r.st] then return 'terminal', r end
  local nxt = finalize(rid, r, 'cancelled', 'cancelled', { request_id = rid, tokens = tonumber(r.n) }, now, ttl,
    via_outbox)
  return 'cancelled', r, produced_by(r, r.a), nxt
end
