-- keys.lua: key and channel names, built from the two hash-tagged prefixes (sessions/keys.py is
-- the Python side and explains the layout; the README's "Keyspace" table lists every key).
--   data plane of a bucket     sg:{s:BB}:   (BB = the first two characters of a request id)
--     r:<rid>          hash   one request (short field names, see sessions/status.py)
--                             cbx: its own expiry (ms) before callback scripts lengthened it (callback_settle.lua)
--     r:<rid>:in       string its prompt or messages JSON (deleted when the request ends)
--     s:<sid>:m        hash   session meta: seq (last event id), base (first id kept), tn (owner),
--                             lm (log cap; absent: the default), bt (boot that wrote last), hl (id holes
--                             left by restarts: log_ids.lua)
--     s:<sid>:q        list   the session's lite queue of request ids (head = current request)
--     s:<sid>:l        list   the session's event log, one "id|event|rid|json" entry per event
--     e:<sid>          sharded channel: live copy of each log append (SPUBLISH)
--     ob               zset   outbox: heads readied here whose control step is unconfirmed (cluster)
--     m                hash   the bucket's share of the metrics ("name|labels" -> value)
--     cb               zset   request id -> when its callback delivery is due (ms): includes/ended.lua
--     u / uf           hash   usage pending / being folded into sg:usage:<hour> (sessions/usage.py)
--     us               string the bucket's last fold sequence (usage_take.lua; expires after 35 days)
--   control plane of a group   sg:{g:G}:
--     rq               hash   sid -> ready spec of each ready session's head request (ready_specs.lua)
--     cls / c<P> / c<P>:<T> / age<P> / cn / btn / bt / vtc / vlast   ready sets and fairness (an idle
--                             tenant's vtc field goes once its return would lift it anyway: fairness.lua)
--     vi               zset   tenant -> when the sweep first found it idle (forget_idle_counters)
--     ri               hash   "rid|attempt" -> run record (JSON) of each dispatched, unreleased run
--     run              zset   running runs, score ranks preemption victims first
--     rt:<T> / ro      zset   a tenant's running runs / tenants by runs over weight (runs.lua run_added)
--     rdur             string the mean duration of the group's finished runs (ms; runs.lua note_run_duration)
--     pre              zset   runs being stopped, worker not yet let go (cancelled; preempted under a max_concurrency cap)
--     pin              set    runs never to preempt: they streamed a tool-call delta (pin.lua)
--     leases           zset   "rid|attempt" -> lease expiry (ms)
--     tk               hash   "rid|attempt" -> worker: the slot each unreleased attempt holds
--     idle             list   one ticket (worker id) per free worker slot
--     wk / workers     zset / hash   the group's workers by last heartbeat / their slot counts
--     wl               hash   worker -> its own lease ms (register_worker, heartbeat; runs.lua worker_lease)
--     w:<wid> / w:<wid>:in / w:<wid>:ctl   liveness (PX) / inbox of assignments / control channel
--     cfg / qs         hash   quota settings / quota state (incl. wake: when a quota admits next; sw / gr: the
--                             sweep's last pass / the workers' grace after a restart, runs.lua store_grace;
--                             vsc / vso: the sweep's HSCAN cursor over vtc / where in its page it goes on,
--                             fairness.lua forget_idle_counters; dqt / dqi: when / from where the sweep's
--                             next check of dlq goes, sweep.lua)
--     hint             list   wakes the group's scheduler loop
--     pol / tw         hash   copies of the policy and of the tenant weights (decisions read these)
--     dlp / dld        zset   ready heads with a deadline: when their slack runs out / their deadline (fairness.lua)
--     dlq              zset   "rid|sid" -> deadline of a request with a "fail" one submitted behind its session's
--                             head (requests.lua d_submit; the sweep ends it if it still waits there, and
--                             drops, checked in turn, the entry of a request gone or ended)
--     dls              hash   default deadline ms per priority class (scheduler/deadlines.py; the API reads it)
--     epw              list   "rid|class": effective classes the sweep gave, for the scheduler to write on the
--                             data plane (cluster; sweep.lua, scheduler/loop.py)
--     m                hash   the group's share of the metrics
--   global             sg:groups (set), sg:groups:hint, sg:models, sg:policy, sg:tenants, sg:keys, sg:clock (tests only);
--                      those no script reads: README "Keyspace"

local PREFIX = 'sg:'
local TERMINAL = { {{TERMINAL}} }
local BUCKETS = { {{BUCKETS}} }

local function dpre(bucket) return PREFIX .. '{s:' .. bucket .. '}:' end
local function dpre_of(rid) return dpre(string.sub(rid, 1, 2)) end
local function gpre(group) return PREFIX .. '{g:' .. group .. '}:' end

local function kreq(rid) return dpre_of(rid) .. 'r:' .. rid end
local function kinput(rid) return dpre_of(rid) .. 'r:' .. rid .. ':in' end
local function kmeta(dp, sid) return dp .. 's:' .. sid .. ':m' end
local function kqueue(dp, sid) return dp .. 's:' .. sid .. ':q' end
local function klog(dp, sid) return dp .. 's:' .. sid .. ':l' end
local function kchan(dp, sid) return dp .. 'e:' .. sid end
local function kworker(cp, wid) return cp .. 'w:' .. wid end
