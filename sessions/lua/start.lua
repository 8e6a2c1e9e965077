-- start.lua (data plane, cluster): a worker starts the run it was assigned: the `started` (or
-- `resumed`) event, and the fence every later write of the request is checked against.
-- KEYS[1] the request's data prefix sg:{s:<bucket>}:
-- ARGV[1] flags   ARGV[2] request id   ARGV[3] attempt   ARGV[4] worker id
-- ARGV[5] how the worker's engine resumes ("continue" | "regenerate" | "": not said)
-- Returns {1, run spec JSON} | {0, status} (the request ended, or a later attempt started).
local ok, spec, status = d_start(ARGV[2], tonumber(ARGV[3]), ARGV[4], clock(), nil, ARGV[5])
if not ok then return { 0, status or 'missing' } end
return { 1, cjson.encode(spec) }
