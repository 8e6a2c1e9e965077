-- ready_specs.lua: a ready spec's fields, and the form it is stored in on the control plane.
--
-- A ready spec is what the control plane ranks, charges and starts a waiting head request by (see
-- ready_spec in requests.lua), and a run record carries its fields (runs.lua spec_of). rq[sid] holds
-- one for each ready session of the group, so there is one per queued head: at a million queued
-- sessions its size is most of the control plane's memory. It is stored compactly, not as JSON:
-- its values in the order of STORED_SPEC, joined by '|', without the names. Left out, as '':
--   - sid (the field's own name) and g (the group whose control plane holds rq);
--   - n, a and pc when 0, ep when it equals p, and rs when it equals sub (all four usual while waiting);
--   - dl, dm, bo, rr and mx when nil (no deadline, not boosted, not preempted, no cap); and every '' at
--     the end.
-- A queued head's entry is thus "rid|tenant|p|mt|it|sub|fs": 211 bytes of server memory as JSON,
-- 87 stored so. No value can hold '|': request ids, tenant and group names are [A-Za-z0-9._-], rr is
-- a preemption's reason. Numbers keep tostring's 14 digits, as cjson's encoding of them did.
-- An entry that starts with '{' is JSON: one stored before this form, or a spec with a field the form
-- has no place for (kept whole rather than lost). Both read as JSON.

-- Every field of a ready spec; a run record's spec part (runs.lua spec_of) copies these.
local SPEC_KEYS = { 'rid', 'sid', 'tn', 'g', 'p', 'ep', 'mt', 'n', 'a', 'it', 'sub', 'pc', 'rs', 'fs', 'dl', 'dm',
  'bo', 'mx' }
-- `rr`: why it was preempted, while its hand-back is on its way (cluster; preemption.lua).
-- `mx`: the highest class a deadline may raise it to (its tenant's max_priority), with a deadline only.
local STORED_SPEC = { 'rid', 'tn', 'p', 'mt', 'it', 'sub', 'fs', 'ep', 'n', 'a', 'pc', 'rs', 'dl', 'dm', 'bo', 'rr',
  'mx' }
local STORED_COUNT = #STORED_SPEC
local TEXT_FIELD = { rid = true, tn = true, rr = true }
local HAS_PLACE = { sid = true, g = true }
for i = 1, STORED_COUNT do HAS_PLACE[STORED_SPEC[i]] = true end -- (no ipairs while a library loads)
local GROUP_FROM = #PREFIX + #'{g:' + 1 -- where a control plane's prefix sg:{g:<group>}: names its group

-- The tokens a request may still generate: its max_tokens less those written, never below 0 (an engine
-- whose backend streams message diffs may write more chunks than max_tokens: workers/engines/openai.py).
local function tokens_left(spec)
  return math.max(0, spec.mt - spec.n)
end

-- A value as stored: nil, false and JSON's null as '' (a field this spec lacks), true as '1'.
local function stored_value(value)
  if value == nil or value == false or value == cjson.null then return '' end
  if value == true then return '1' end
  return tostring(value)
end

-- The stored form of `spec` (its sid and g are not part of it); JSON when it has a field without a place.
local function spec_encode(spec)
  for name in pairs(spec) do
    if not HAS_PLACE[name] then return cjson.encode(spec) end
  end
  local p, sub, ep, rs, n, a, pc = spec.p, spec.sub, spec.ep, spec.rs, spec.n, spec.a, spec.pc
  local parts = { stored_value(spec.rid), stored_value(spec.tn), stored_value(p), stored_value(spec.mt),
    stored_value(spec.it), stored_value(sub), stored_value(spec.fs),
    ep ~= p and stored_value(ep) or '', n ~= 0 and stored_value(n) or '', a ~= 0 and stored_value(a) or '',
    pc ~= 0 and stored_value(pc) or '', rs ~= sub and stored_value(rs) or '', stored_value(spec.dl),
    stored_value(spec.dm), stored_value(spec.bo), stored_value(spec.rr), stored_value(spec.mx) }
  local last = STORED_COUNT
  while last > 0 and parts[last] == '' do last = last - 1 end
  return table.concat(parts, '|', 1, last)
end

-- The spec stored as `raw` in control plane `cp`'s rq[sid].
local function spec_decode(raw, sid, cp)
  if string.byte(raw, 1) == 123 then return cjson.decode(raw) end -- '{': JSON (see above)
  local spec, i = { sid = sid, g = string.sub(cp, GROUP_FROM, -3), n = 0, a = 0, pc = 0 }, 0
  for value in string.gmatch(raw, '([^|]*)|?') do
    i = i + 1
    local name = STORED_SPEC[i]
    if not name then break end
    if value ~= '' then
      if TEXT_FIELD[name] then spec[name] = value else spec[name] = tonumber(value) end
    end
  end
  spec.ep = spec.ep or spec.p
  spec.rs = spec.rs or spec.sub
  return spec
end
