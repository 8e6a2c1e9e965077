-- call.lua: what every function does around its body: the clock, and the events it emits, written
-- when the call ends. sessions/library.py wraps each function body as
--   begin_call(); return end_call(pcall(body))
-- Locals here outlive a call (the library's top level runs once, at load), so anything kept per
-- call is reset in begin_call().

local pinned_clock = false -- tests pin the clock with sg:clock; production never reads it
-- A single-server call runs both planes' steps of a transition itself (flag "S"); on a cluster each
-- step is a call of its own, in the slot of its plane (README, "Growing past one Redis").
local single_server = false
-- What a call reads once and keeps for its own length, by key: a group's policy and quota config
-- (policy.lua, quotas.lua), which only the admin API writes; and a request the call has just stored
-- (requests.lua d_submit), which its start in the same call then need not read back. Reset by begin_call.
local per_call = {}

-- Milliseconds since the epoch from the server clock, so every process agrees on "now".
local function clock()
  if pinned_clock then
    local pinned = redis.call('GET', PREFIX .. 'clock')
    if pinned then return tonumber(pinned) end
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end

local outbox, outbox_sessions = {}, {} -- per call: the events emitted, by session (see emit_many)

-- The functions VM's garbage collector, paced by this library. The server runs a collector step inside
-- every 50th script call (Valkey and Redis: LUA_GC_CYCLE_PERIOD in script_lua.c), of 50 x 10 x the VM's
-- step multiplier units of work. At Lua's default multiplier (200) that one call in 50 swept and freed
-- thousands of the previous calls' objects, and those calls made the scheduling decision's tail (p99
-- 1.30 ms at 100k queued, 0.59 ms leaving out the calls at those phases; README, Design decisions, "The
-- Lua collector's pace"). At 25 that step is an eighth as long, and the collector's work is spread over
-- the calls as they allocate; the VM's heap measured 0.5-0.9 MB all along (0.3-0.5 MB before).
-- The multiplier can only be set inside a call (the server refuses collectgarbage while a library
-- loads), so every call sets it (two C calls): whatever set it otherwise since (a restart's new VM,
-- another library) is put right by the next call.
-- Below 100 Lua's collector may fall behind what the calls allocate (a small object costs more to sweep
-- than its bytes earn the collector), or a large argument (a prompt of many MB) may sit in the heap for
-- a while. So once the heap passes GC_HEAP_HIGH_KB the calls set Lua's default pace until it is under
-- GC_HEAP_LOW_KB again: the collector catches up in steps, with no call stopped for a full collection
-- (which took 20-30 ms at 8 MB).
local GC_STEP_MULTIPLIER = 25
local GC_CATCH_UP_MULTIPLIER = 200 -- Lua's default
local GC_HEAP_HIGH_KB = 4096
local GC_HEAP_LOW_KB = 2048
local gc_catching_up = false

local function pace_collector()
  local heap = collectgarbage('count')
  if heap > GC_HEAP_HIGH_KB then
    gc_catching_up = true
  elseif heap < GC_HEAP_LOW_KB then
    gc_catching_up = false
  end
  collectgarbage('setstepmul', gc_catching_up and GC_CATCH_UP_MULTIPLIER or GC_STEP_MULTIPLIER)
end

-- `flags`: the first argument of every function: "S" single server, "T" pinned test clock.
local function begin_call(flags)
  pace_collector()
  pinned_clock = string.find(flags, 'T', 1, true) ~= nil
  single_server = string.find(flags, 'S', 1, true) ~= nil
  per_call = {}
  outbox, outbox_sessions = {}, {}
  checked_metas, last_ids = {}, {}
end

-- Events get their ids at once; they are written when the call ends, one RPUSH and one SPUBLISH per
-- session however many events it emitted (a submit that starts its request at once emits `queued`
-- and `started`: one log write and one message for the API to read, on the first token's way).
local function outbox_of(dp, sid)
  local key = dp .. sid
  local entries = outbox[key]
  if not entries then
    entries = {}
    outbox[key] = entries
    outbox_sessions[#outbox_sessions + 1] = { dp, sid, key }
  end
  return entries
end

local function emit_many(dp, sid, items)
  local first = take_ids(kmeta(dp, sid), #items) - #items + 1
  local entries = outbox_of(dp, sid)
  for i, item in ipairs(items) do
    entries[#entries + 1] = (first + i - 1) .. '|' .. item[1] .. '|' .. item[2] .. '|' .. item[3]
  end
  return first
end

-- `token` events of request `rid`, their data args[from..]: emit_many without a table per token (an
-- append is most of the calls a request makes).
local function emit_tokens(dp, sid, rid, args, from)
  local count = #args - from + 1
  local first = take_ids(kmeta(dp, sid), count) - count + 1
  local entries = outbox_of(dp, sid)
  local kind = '|token|' .. rid .. '|'
  for i = from, #args do entries[#entries + 1] = (first + i - from) .. kind .. args[i] end
  return first
end

local function emit(dp, sid, event, rid, data)
  return emit_many(dp, sid, { { event, rid, cjson.encode(data) } })
end

-- Every call ends here, with pcall's results: the events go out even when the call failed half-way
-- (an id taken must have its entry, or the log's offsets would no longer match the ids), then the
-- error, if any, is raised again.
--
-- The log is bounded (--session-log-max-events): its cap is stored in the session meta (`lm`) by each
-- submit, so no other caller passes it. After the append, entries past the newest `lm` are trimmed
-- (LTRIM, O(trimmed)) and the meta's `base` (id of the oldest kept entry) moves on; readers map ids to
-- list offsets with it and refuse cursors older than base - 1 (sessions/store.py). The events of the
-- session's current head request (from its `queued` event on) are never trimmed: a resume of a
-- running or preempted request rebuilds its output from them (sessions/runs.py `output_so_far`).
-- The queue is in submit order, so no request that has not ended loses an event. A log may thus
-- exceed its cap until its head ends: by the head's events (at most its max_tokens + a few) and by
-- those of the requests that ran while it waited (a deep queue).
local LOG_MIN_EVENTS = {{LOG_MIN_EVENTS}} -- the smallest cap allowed: shorter logs are never trimmed
local LOG_MAX_EVENTS = {{LOG_MAX_EVENTS}} -- the default cap, for a session whose meta has none

local function trim_log(dp, sid, length)
  local meta = kmeta(dp, sid)
  local cap = checked_metas[meta] -- known once the call took event ids (take_ids) or made the meta
  if cap == nil then cap = tonumber(redis.call('HGET', meta, 'lm') or '') end
  cap = cap or LOG_MAX_EVENTS
  if length <= cap then return end
  local drop = length - cap
  local kept = redis.call('HMGET', meta, 'base', 'hl')
  local base, holes = tonumber(kept[1] or '1'), parse_holes(kept[2])
  local head = redis.call('LINDEX', kqueue(dp, sid), 0)
  local fs = head and tonumber(redis.call('HGET', kreq(head), 'fs') or '')
  if fs and fs >= base then drop = math.min(drop, offset_after(fs - 1, base, holes)) end
  if drop <= 0 then return end
  redis.call('LTRIM', klog(dp, sid), drop, -1)
  base = id_at(drop, base, holes)
  redis.call('HSET', meta, 'base', base)
  if kept[2] then
    local hl = holes_after(holes, base)
    if hl then redis.call('HSET', meta, 'hl', hl) else redis.call('HDEL', meta, 'hl') end
  end
end

local function end_call(ok, result)
  for _, s in ipairs(outbox_sessions) do
    local entries = outbox[s[3]]
    write_last_id(kmeta(s[1], s[2]))
    local length = redis.call('RPUSH', klog(s[1], s[2]), unpack(entries))
    redis.call('SPUBLISH', kchan(s[1], s[2]), table.concat(entries, '\n'))
    if length > LOG_MIN_EVENTS then trim_log(s[1], s[2], length) end
  end
  if not ok then error(result, 0) end
  return result
end
