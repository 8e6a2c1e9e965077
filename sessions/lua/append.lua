-- append.lua (data plane): append a batch of token events for a running request, fenced by attempt
-- so that a worker that lost the request (preempted, cancelled, lease expired) cannot write into its
-- stream.
-- KEYS[1] the request's data prefix sg:{s:<bucket>}:
-- ARGV[1] flags   ARGV[2] request id   ARGV[3] attempt   ARGV[4] index of the first token in this batch
-- ARGV[5] the worker's clock (ms) when it took the run from its inbox, called the engine and got the
--         engine's first token, "took|called|first", with the request's first batch ("" otherwise);
--         kept with its first token
-- ARGV[6..] token event data (JSON), one per token, in index order
-- Returns {1, tokens so far} | {0, status} when fenced | {-1, expected index} on a gap/overlap. A batch
-- resent after its reply was lost (it had landed) is refused as an overlap with expected = first +
-- batch size, which the writer takes as success (sessions/runs.py).
local dp, rid, attempt, first = KEYS[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local r = load(rid, { 'st', 'a', 'n', 'sid', 'g', 'tn', 'p', 'sub', 'ft', 'dl' })
if not owns(r, attempt) then
  count(dp .. 'm', 'fenced', r.g or '?') -- a late write from a worker that lost the run (operators' signal)
  return { 0, r.st or 'missing' }
end
if tonumber(r.n) ~= first then return { -1, tonumber(r.n) } end
local items = {}
for i = 6, #ARGV do items[#items + 1] = { 'token', rid, ARGV[i] } end
emit_many(dp, r.sid, items)
local total = redis.call('HINCRBY', kreq(rid), 'n', #items)
if not r.ft then
  local now = clock()
  local took, called, answered = string.match(ARGV[5], '^(%d+%.?%d*)|(%d+%.?%d*)|(%d+%.?%d*)$')
  if took then -- where the first token's time went in the worker and its engine (GET /v1/requests/{id})
    redis.call('HSET', kreq(rid), 'ft', now, 'et', took, 'ec', called, 'ef', answered)
  else
    redis.call('HSET', kreq(rid), 'ft', now)
  end
  observe(dp .. 'm', 'ttft', r.g .. '|' .. r.p, (now - tonumber(r.sub)) / 1000)
  if r.dl then -- the deadline is a time-to-first-token objective: met or missed now
    local met = now <= tonumber(r.dl)
    redis.call('HSET', kreq(rid), 'dmt', met and '1' or '0')
    count(dp .. 'm', 'deadlines', r.g .. '|' .. r.p .. '|' .. (met and 'met' or 'missed'))
  end
end
count(dp .. 'm', 'tokens', r.g .. '|' .. r.p .. '|' .. r.tn, #items)
return { 1, total }
