-- quotas.lua: group quotas. GCRA for requests/s (with burst), a token bucket for tokens/s that may go
-- into debt by a reservation (reserved at dispatch, reconciled when the run ends), and a cap on
-- concurrency (runs in flight, including those being stopped).

local MIN_RATE = 1e-6 -- per second

-- Read once per call and group, as policy() is (call.lua per_call: a finish reads it to refund, then to
-- fill the freed slot); only the admin API writes it, never a function. Callers do not change the table.
local function quota_config(cp)
  local key = 'quota|' .. cp
  local cfg = per_call[key]
  if cfg then return cfg end
  local c = redis.call('HMGET', cp .. 'cfg', 'requests_per_second', 'tokens_per_second', 'burst',
    'max_concurrency', 'burst_tokens')
  cfg = { rps = tonumber(c[1]), tps = tonumber(c[2]), burst = tonumber(c[3]) or 1, mc = tonumber(c[4]) }
  -- the API's floor (scheduler/quota.py), for a rate stored before it: a lower one made the interval
  -- infinite and the arithmetic NaN, which admits everything
  if cfg.rps then cfg.rps = math.max(cfg.rps, MIN_RATE) end
  if cfg.tps then cfg.tps = math.max(cfg.tps, MIN_RATE) end
  if cfg.tps then cfg.cap = tonumber(c[5]) or cfg.tps end
  per_call[key] = cfg
  return cfg
end

-- The bucket's level at `now`, and its generation (tgen: bumped by the admin API each time the tokens/s
-- quota is removed, scheduler/admin.py set_quota; 0 before the first removal). A run refunds only into the
-- bucket of the generation it reserved from: one removed and set again while it ran is a new bucket.
local function token_level(cp, cfg, now)
  local s = redis.call('HMGET', cp .. 'qs', 'lvl', 'at', 'tgen')
  local level, at, gen = tonumber(s[1]), tonumber(s[2]), tonumber(s[3]) or 0
  if not level then return cfg.cap, gen end
  return math.min(cfg.cap, level + (now - at) * cfg.tps / 1000), gen
end

-- The GCRA theoretical arrival time, never in the past. It is stored with the interval it was
-- computed at ('ti'): after a rate change the outstanding debt is rescaled to the new interval, so
-- a new rate applies from the next decision (raised: no waiting out the old interval; lowered: the
-- burst already used is not forgotten).
-- The rescaled debt is stored at once, with its interval: a gate that refuses writes nothing else, and the
-- stored time at the old interval would otherwise lapse at the old rate's pace, admitting early (and the
-- stats' next admission would say the old time). Only the first decision after a change writes.
-- A state that is not finite (stored under a rate whose interval was, before rates had a floor) is
-- taken as none: NaN compares false with everything and would admit every request for good.
local function gcra_tat(cp, interval, now)
  local s = redis.call('HMGET', cp .. 'qs', 'tat', 'ti')
  local tat, ti = tonumber(s[1]), tonumber(s[2])
  if not (tat and tat > now and tat < math.huge) then return now end
  local rescaled = ti and ti ~= interval
  if rescaled then tat = now + (tat - now) * interval / ti end
  if not (tat > now and tat < math.huge) then return now end
  if rescaled then redis.call('HSET', cp .. 'qs', 'tat', tat, 'ti', interval) end
  return tat
end

-- Slots in use: running requests plus runs being stopped whose worker has not let go (pre: cancelled, or
-- preempted under this cap). A run stopped with its slot handed over counts no more: the taker's does.
local function in_flight(cp, now)
  redis.call('ZREMRANGEBYSCORE', cp .. 'pre', '-inf', now)
  return redis.call('ZCARD', cp .. 'run') + redis.call('ZCARD', cp .. 'pre')
end

-- Returns ok, wake_ms (when a rate quota will admit it), reason.
local function quota_gate(cp, cfg, reserve, first_run, now)
  if cfg.rps and first_run then
    local interval = 1000 / cfg.rps
    local allow_at = gcra_tat(cp, interval, now) - (cfg.burst - 1) * interval
    if allow_at > now + 0.001 then return false, allow_at, 'requests_per_second' end
  end
  if cfg.tps then
    local need = math.min(reserve, cfg.cap)
    local level = token_level(cp, cfg, now)
    if level < need then return false, now + (need - level) * 1000 / cfg.tps, 'tokens_per_second' end
  end
  if cfg.mc and in_flight(cp, now) >= cfg.mc then return false, nil, 'max_concurrency' end
  return true
end

-- Returns the tokens/s bucket's generation reserved from (nil without that quota), for the run's refund.
local function quota_take(cp, cfg, reserve, first_run, now)
  if cfg.rps and first_run then
    local interval = 1000 / cfg.rps
    redis.call('HSET', cp .. 'qs', 'tat', gcra_tat(cp, interval, now) + interval, 'ti', interval)
  end
  if cfg.tps then
    local level, gen = token_level(cp, cfg, now)
    redis.call('HSET', cp .. 'qs', 'lvl', level - reserve, 'at', now)
    return gen
  end
end

-- `gen`: the generation the tokens were reserved from (quota_take); none is generation 0 (a run recorded
-- before generations, or before the first removal).
local function quota_refund(cp, unused, now, gen)
  local cfg = quota_config(cp)
  if cfg.tps and unused > 0 then
    local level, current = token_level(cp, cfg, now)
    if (tonumber(gen) or 0) ~= current then return end
    redis.call('HSET', cp .. 'qs', 'lvl', math.min(cfg.cap, level + unused), 'at', now)
  end
end

-- Wake the group's scheduler loop for a sweep (it waits on its hint list): one entry at most, since a
-- hint already there ends its next wait at once all the same.
local function hint_scheduler(cp)
  if redis.call('LLEN', cp .. 'hint') == 0 then redis.call('LPUSH', cp .. 'hint', 1) end
end

-- The group's scheduler loop sleeps until the earliest of these wake-ups (a quota refill, the end
-- of a preemption quantum): note one and nudge the loop if it sleeps longer. The loop sleeps no later
-- than the wake noted when its last sweep ended (sweep.lua), and that sweep cleared the hint list: a
-- wake no earlier than the one noted needs no hint (each would cost a sweep that finds nothing to do).
local function note_wake(cp, wake)
  local current = tonumber(redis.call('HGET', cp .. 'qs', 'wake') or '')
  if current and wake >= current then return end
  redis.call('HSET', cp .. 'qs', 'wake', wake)
  hint_scheduler(cp)
end
