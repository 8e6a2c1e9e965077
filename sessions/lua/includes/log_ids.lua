-- log_ids.lua: event ids, never issued twice, and where each lives in a session's log list.
--
-- A server that restarts from an older state forgets the ids it handed out last: with AOF and
-- appendfsync everysec it loses up to about a second of writes, and a failover loses what the replica
-- had not received. Issued again, those ids would name other events, and a client resuming from one
-- would silently get them. So the first id a session assigns after its server (re)started skips
-- LOG_ID_JUMP ids: the meta's `bt` holds the boot of the library that wrote last, and a library local
-- (reset whenever the library loads: a restart, a failover, a new version) tells this boot's. The
-- skipped ids are a hole, "hs:he" in the meta's `hl` (ascending, comma-separated): ids hs+1 .. he-1
-- were never kept. A cursor in hs+1 .. he-2 may be an id handed out and lost, so readers refuse it
-- (409, sessions/store.py); he-1 is the same place as hs. A jump without a loss (a clean restart, a
-- reload) costs nothing but id space; ids stay exact Lua numbers for 2^53 / LOG_ID_JUMP restarts.
-- The log list itself stays contiguous: offsets skip the holes.

local LOG_ID_JUMP = 1000000
local boot_id = false -- the server's clock (us) when this library loaded, in base 36 (see base36)

-- A non-negative integer below 2^53 in base 36: a boot id in 10 characters, not the 17 of "s.us" (it
-- is in every session's meta, and a million idle sessions pay for each byte). Only compared for equality.
local function base36(n)
  local digits, out = '0123456789abcdefghijklmnopqrstuvwxyz', ''
  repeat
    local digit = n % 36
    out = string.sub(digits, digit + 1, digit + 1) .. out
    n = (n - digit) / 36
  until n == 0
  return out
end

local function parse_holes(hl)
  local holes = {}
  if hl then
    for a, b in string.gmatch(hl, '(%d+):(%d+)') do holes[#holes + 1] = { tonumber(a), tonumber(b) } end
  end
  return holes
end

-- The offset in the log list of the first entry with an id > cursor (cursor >= base - 1): the number
-- of ids kept from base to cursor.
local function offset_after(cursor, base, holes)
  local offset = cursor - base + 1
  for _, h in ipairs(holes) do
    local lo, hi = math.max(h[1] + 1, base), math.min(h[2] - 1, cursor)
    if hi >= lo then offset = offset - (hi - lo + 1) end
  end
  return math.max(offset, 0)
end

-- The id of the entry at `offset` in the log list whose first entry has id `base`.
local function id_at(offset, base, holes)
  local id = base + offset
  for _, h in ipairs(holes) do
    if h[1] >= base and h[1] < id then id = id + h[2] - h[1] - 1 end
  end
  return id
end

-- The holes a log whose oldest kept id is `base` still needs, as the meta's `hl` (false: none): those
-- after it, and those that end right at it (no id between them and base was kept: a reader at the
-- hole's start has missed nothing, sessions/store.py LogBounds.trimmed), walked back through holes
-- that run into each other (a jump with no event after it, then another).
local function holes_after(holes, base)
  local kept, reach = {}, base
  for i = #holes, 1, -1 do
    local h = holes[i]
    if h[2] >= reach then
      table.insert(kept, 1, h[1] .. ':' .. h[2])
      reach = math.min(reach, h[1] + 1)
    end
  end
  return #kept > 0 and table.concat(kept, ',')
end

-- The metas whose boot this call has checked (check_boot) or made (create_meta), each with the session's
-- log cap (its `lm` as read and written by the call; false: none stored), so that a second batch of events
-- in one call, and the trim after the call's append (call.lua trim_log), read nothing more. Reset by
-- begin_call (call.lua): only d_submit writes `lm`, before its first event.
local checked_metas = {}
-- The last id each of those metas has issued, as the call goes: its `seq`, written back once, with the
-- call's events, by end_call (call.lua write_last_id), where each batch of ids cost a HINCRBY. Reset by
-- begin_call.
local last_ids = {}

local function this_boot()
  if not boot_id then
    local t = redis.call('TIME')
    boot_id = base36(tonumber(t[1]) * 1000000 + tonumber(t[2]))
  end
  return boot_id
end

-- Create a new session's meta: its owner, this boot (it has issued no id, so there is nothing to skip)
-- and its log cap (false: the default, unstored), in one write that leaves take_ids nothing to check.
local function create_meta(meta, tenant, log_cap)
  if log_cap then
    redis.call('HSET', meta, 'tn', tenant, 'bt', this_boot(), 'lm', log_cap)
  else
    redis.call('HSET', meta, 'tn', tenant, 'bt', this_boot())
  end
  checked_metas[meta] = log_cap and tonumber(log_cap) or false
  last_ids[meta] = 0
end

-- Check an existing meta's boot, from its `bt` and `seq` as stored, and note its log cap `lm` (nil: the
-- default) for the call: when the session was last written before this library loaded, its next id skips
-- LOG_ID_JUMP (see above). d_submit passes what its own first read of the meta got. The meta's holes (`hl`)
-- are read only for a jump, once a session and boot: every other call reads one field fewer.
local function check_boot(meta, written_boot, seq, cap)
  local boot = this_boot()
  local last = tonumber(seq or '0')
  if written_boot ~= boot then
    if written_boot and seq then
      local hole = last .. ':' .. (last + LOG_ID_JUMP + 1)
      local holes = redis.call('HGET', meta, 'hl')
      last = last + LOG_ID_JUMP
      -- the jump is written at once, with the boot that makes it: a call that fails before its first event
      -- must not leave the boot noted and the ids not skipped
      redis.call('HSET', meta, 'bt', boot, 'seq', last, 'hl', holes and (holes .. ',' .. hole) or hole)
    else
      redis.call('HSET', meta, 'bt', boot)
    end
  end
  checked_metas[meta] = tonumber(cap or '') or false
  last_ids[meta] = last
end

-- Take `count` ids for a session's next events; returns the last. The meta's `seq` is written when the
-- call ends (call.lua end_call), with the events these ids name.
local function take_ids(meta, count)
  if checked_metas[meta] == nil then
    local written = redis.call('HMGET', meta, 'bt', 'seq', 'lm')
    check_boot(meta, written[1], written[2], written[3])
  end
  local last = last_ids[meta] + count
  last_ids[meta] = last
  return last
end

-- The meta's `seq` after the ids this call took (end_call, once a meta, with the call's events).
local function write_last_id(meta)
  redis.call('HSET', meta, 'seq', string.format('%d', last_ids[meta])) -- an integer's digits, never 1e+14
end
