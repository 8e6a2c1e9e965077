-- finish.lua (data plane, cluster): end a run as done or failed and advance its session. The worker
-- then makes the session's next head ready (ready.lua) and lets go of its slot (release.lua); if it
-- dies first, the outbox and the run's lapsing lease let the scheduler finish the job.
-- KEYS[1] the request's data prefix sg:{s:<bucket>}:
-- ARGV[1] flags   ARGV[2] session ttl s   ARGV[3] request id   ARGV[4] attempt   ARGV[5] worker id
-- ARGV[6] outcome ("done" | "failed")   ARGV[7] finish_reason or error message ("deadline_exceeded": a
--         `fail` deadline passed before the first token; the function words the message, see d_finish)
-- ARGV[8] the backend's usage for the whole request, JSON, or "" (none reported)
-- ARGV[9] the index of the first of the run's last tokens, which this call appends before it ends the
--         run ("" when it carries none)   ARGV[10] as append.lua's ARGV[5]
-- ARGV[11..] those tokens' event data (JSON), one per token, in index order
-- Returns {finished 1|0, status before, tokens this attempt produced (-1 unknown), next head's
-- ready spec JSON or "", (refused) the request's spec JSON to requeue or "", the request's input
-- tokens as the backend counted them (-1 unknown)}. The same end resent after its reply was lost is
-- refused (0) with the first reply's counts and the session's waiting head (requests.lua ended_by).
local usage = ARGV[8] -- its text, kept as it is (usage_of, requests.lua)
local r = append_tail(KEYS[1], ARGV[3], ARGV[4], ARGV[5], ARGV[9] or '', ARGV[10] or '', ARGV, 11)
local finished, status, produced, nxt, requeue, prompt = d_finish(ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], usage,
  clock(), tonumber(ARGV[2]), true, r)
return { finished and 1 or 0, status, produced or -1, nxt and cjson.encode(nxt) or '',
  requeue and cjson.encode(requeue) or '', prompt or -1 }
