-- submit.lua (data plane): store a request at the tail of its session's lite queue (creating the
-- session on first use) and emit `queued`. Its head, when it is one, is then made ready on the
-- control plane (ready.lua); on one server submit_one.lua does both in one call.
-- KEYS[1] the session's data prefix sg:{s:<bucket>}:
-- ARGV[1] flags   ARGV[2] request id   ARGV[3] session id   ARGV[4] tenant   ARGV[5] group
-- ARGV[6] priority   ARGV[7] max_tokens   ARGV[8] input (prompt text or messages JSON)
-- ARGV[9] input kind ("p" prompt | "m" messages)   ARGV[10] params JSON   ARGV[11] input tokens
-- ARGV[12] owner to enforce ("" = none)   ARGV[13] the session log's cap (--session-log-max-events;
-- absent or "" = keep the stored one, else the default)   ARGV[14] deadline ms ("" = none)
-- ARGV[15] on deadline miss ("run" | "fail")   ARGV[16] the highest class a deadline may raise it to (its
-- tenant's max_priority; absent or "" = any)
-- Returns {"ok", seq of the queued event, ready spec JSON or "", deadline ms or ""} |
-- {"forbidden", owner, "", ""}; the deadline (ms, rounded up) of a request with "on_deadline_miss": "fail"
-- that waits behind its session's head, for the caller to note in its group's dlq (member "rid|sid"),
-- where the sweep finds it (only a head is readied, and dld holds only heads).
local outcome, seq, spec, behind = d_submit(KEYS[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8],
  ARGV[9], ARGV[10], ARGV[11], ARGV[12], clock(), true, ARGV[13], ARGV[14], ARGV[15], ARGV[16])
return { outcome, seq, spec and cjson.encode(spec) or '', behind or '' }
