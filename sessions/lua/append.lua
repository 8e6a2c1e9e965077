-- append.lua: append a batch of token events for a running request, fenced by attempt so that a
-- worker that lost the request (preempted, cancelled, lease expired) cannot write into its stream.
-- KEYS[1] request hash sg:r:<rid>
-- ARGV[1] request id   ARGV[2] attempt   ARGV[3] index of the first token in this batch
-- ARGV[4..] token event data (JSON), one per token, in index order
-- Returns {1, tokens so far} | {0, status} when fenced | {-1, expected index} on a gap/overlap. A batch
-- resent after its reply was lost (it had landed) is refused as an overlap with expected = first +
-- batch size, which the writer takes as success (sessions/runs.py).
local rid, attempt, first = ARGV[1], ARGV[2], tonumber(ARGV[3])
local r = load(rid, { 'st', 'a', 'n', 'sid', 'g', 'tn', 'p', 'sub', 'ft' })
if not owns(r, attempt) then
  count('fenced', r.g or '?') -- a late write from a worker that lost the run (operators' signal)
  return { 0, r.st or 'missing' }
end
if tonumber(r.n) ~= first then return { -1, tonumber(r.n) } end
local items = {}
for i = 4, #ARGV do items[#items + 1] = { 'token', rid, ARGV[i] } end
emit_many(r.sid, items)
local total = redis.call('HINCRBY', KEYS[1], 'n', #items)
if not r.ft then
  local now = clock()
  redis.call('HSET', KEYS[1], 'ft', now)
  observe('ttft', r.g .. '|' .. r.p, (now - tonumber(r.sub)) / 1000)
end
count('tokens', r.g .. '|' .. r.p .. '|' .. r.tn, #items)
return { 1, total }
