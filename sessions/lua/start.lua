-- start.lua (data plane, cluster): a worker starts the run it was assigned: the `started` (or
-- `resumed`) event, and the fence every later write of the request is checked against.
-- KEYS[1] the request's data prefix sg:{s:<bucket>}:
-- ARGV[1] flags   ARGV[2] request id   ARGV[3] attempt   ARGV[4] worker id
-- ARGV[5] how the worker's engine resumes ("continue" | "regenerate" | "": not said)
-- ARGV[6] why the control plane stopped the previous attempt ("priority" | "fair_share" | "": not by it).
-- A previous attempt still running (its hand-back has not come) is fenced here: its `preempted` event
-- gives this reason when it names a preemption and that attempt is attempt - 1, else "superseded".
-- Returns {1, run spec JSON} | {0, status} (the request ended, or a later attempt started).
local stopped_for = ARGV[6] ~= '' and ARGV[6] or nil
local ok, spec, status = d_start(ARGV[2], tonumber(ARGV[3]), ARGV[4], clock(), stopped_for, ARGV[5])
if not ok then return { 0, status or 'missing' } end
return { 1, cjson.encode(spec) }
