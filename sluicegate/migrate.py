"""`sluicegate migrate`: move a deployment's sessions and requests from the old key layout to the
current one (sessions/keys.py, docs/cluster.md), losing none of them.

The old layout (before the cluster layout) had no hash tags: a request hash `sg:r:<rid>` and its input
`sg:r:<rid>:in`, a session's meta, lite queue and event log `sg:s:<sid>:m|q|l`, each group's control
plane under `sg:g:<G>:`, and global `sg:leases`, `sg:wake`, `sg:hint`, `sg:workers`, `sg:w:<wid>[:in]`,
`sg:m:<name>` (metrics); its request ids were 12 URL-safe characters. The new layout keeps a session's
data under its bucket's prefix and a request id starts with that bucket, so an old request gets the id
`bucket + old id` (recognisable), and `sg:alias:<old id>` (keys.alias) names the new one: as long as an ended
request is kept, for ALIAS_RETENTION (7 days; the session TTL when longer) for one still waiting. The API
reads it when an id names no request (api/requests_routes.py `migrated_id`): an old id keeps working.

Procedure: stop the old API, scheduler and workers (a worker hands its running requests back on
SIGTERM; a request still marked running is taken as preempted: it resumes from its tokens so far), run
`sluicegate migrate`, start the new version. Per session, in this order, each step idempotent:

1. the new data plane, in one transaction (one slot): meta and log (same event ids, the request ids
   in entries rewritten; a request still marked running gets a `preempted` event, reason
   `migration`), the lite queue in the same order, each request's hash and input; TTLs as they were
   (an idle session and its ended requests keep what remains of theirs, queued work has none);
2. the aliases;
3. the session's head made ready on its group's control plane (the library's `ready` function);
4. the session's old keys deleted.

Before the sessions: each group is registered with its copies of `sg:policy` and `sg:tenants` and its
quota settings (`sg:g:<G>:cfg`); after them every remaining old key is deleted (the old control plane:
ready sets, counters, runs, leases, workers, metrics). Dying half-way and running it again is harmless
(a session is redone until its old keys are gone), and a second run finds nothing to do.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from sluicegate.sessions import keys
from sluicegate.sessions.connect import RedisUnavailable, async_client, check_redis
from sluicegate.sessions.registry import copy_policy, register_group
from sluicegate.sessions.scripts import Scripts
from sluicegate.settings import Settings

OLD_REQUEST = keys.PREFIX + "r:"  # sg:r:<rid>, sg:r:<rid>:in
OLD_SESSION = keys.PREFIX + "s:"  # sg:s:<sid>:m | :q | :l
OLD_GROUP = keys.PREFIX + "g:"  # sg:g:<G>:<suffix>
OLD_PATTERNS = tuple(keys.PREFIX + p + ":*" for p in ("r", "s", "g", "w", "m", "e"))
OLD_SINGLETONS = tuple(keys.PREFIX + name for name in ("leases", "wake", "hint", "workers"))
ALIAS_RETENTION = 7 * 24 * 3600  # s: how long an old id of a request still waiting at migration names its new one
# The request hash fields the new layout uses (the old run bookkeeping w, ds, dn, ce, cr, rs, rel<N>
# belonged to the old control plane).
REQUEST_FIELDS = ("sid", "tn", "g", "p", "ep", "mt", "ik", "pa", "it", "st", "sub", "n", "a", "fs", "sa", "ft",
                  "fin", "err", "pc")
OLD_ID = re.compile(r"[A-Za-z0-9_-]{1,62}")
CHUNK = 1000


def is_old_key(key: str) -> bool:
    """A key of the old layout (the new one's keys start with `sg:{`; sg:groups, sg:tenants, sg:policy,
    sg:keys keep their names and are not old keys)."""
    if key.startswith(keys.PREFIX + "{"):
        return False
    return key in OLD_SINGLETONS or any(key.startswith(p[:-1]) for p in OLD_PATTERNS)


def new_request_id(sid: str, old_rid: str) -> str:
    return keys.bucket_of_session(sid) + old_rid


def _number(value: str | None, default: float = 0) -> float | int:
    number = float(value) if value not in (None, "") else float(default)
    return int(number) if number.is_integer() else number


def rewrite_entry(entry: str, bucket: str) -> str:
    """A log entry "id|event|rid|json" with its request id (field and JSON `request_id`) in the new form."""
    seq, name, rid, data = entry.split("|", 3)
    if not OLD_ID.fullmatch(rid):
        return entry
    new = bucket + rid
    old_member = f'"request_id":"{rid}"'
    if old_member in data:  # a quote in a JSON string is escaped: this is the member, never text
        data = data.replace(old_member, f'"request_id":"{new}"')
    else:
        try:
            body = json.loads(data)
        except ValueError:
            body = None
        if isinstance(body, dict) and body.get("request_id") == rid:
            body["request_id"] = new
            data = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    return f"{seq}|{name}|{new}|{data}"


@dataclass
class OldRequest:
    rid: str
    fields: dict[str, str]
    pttl: int  # ms; -1 none
    input: str | None

    @property
    def status(self) -> str:
        return self.fields.get("st", "")

    @property
    def ended(self) -> bool:
        return self.status in keys.TERMINAL_STATUSES


@dataclass
class SessionPlan:
    sid: str
    meta: dict[str, str]
    meta_pttl: int
    log: list[str]
    log_pttl: int
    queue: list[str]  # old ids, head first, as stored
    requests: dict[str, OldRequest]  # old id -> request (queued and ended ones still stored)

    @property
    def bucket(self) -> str:
        return keys.bucket_of_session(self.sid)

    def new_id(self, rid: str) -> str:
        return self.bucket + rid

    @property
    def waiting(self) -> list[OldRequest]:
        """The queue's requests that still wait, in order (an ended or missing one cannot run)."""
        return [self.requests[rid] for rid in self.queue if rid in self.requests and not self.requests[rid].ended]

    @property
    def dropped(self) -> list[str]:
        return [rid for rid in self.queue if rid not in self.requests or self.requests[rid].ended]

    @property
    def stranded(self) -> list[OldRequest]:
        """Requests that still wait but are in no queue (they cannot run): copied, counted, not queued."""
        return [r for r in self.requests.values() if not r.ended and r.rid not in self.queue]

    @property
    def interrupted(self) -> list[OldRequest]:
        """Requests still marked running (their worker did not hand them back): at most the head."""
        return [r for r in self.requests.values() if r.status == "running"]

    def new_log(self) -> tuple[list[str], int]:
        """The rewritten log and the session's last event id, with a `preempted` event (reason
        `migration`, at the tokens so far) for an interrupted request, as a hand-back would have written."""
        entries = [rewrite_entry(entry, self.bucket) for entry in self.log]
        seq = int(self.meta.get("seq", 0))
        for request in self.interrupted:
            seq += 1
            rid = self.new_id(request.rid)
            data = {"request_id": rid, "index": int(request.fields.get("n", 0)), "reason": "migration"}
            entries.append(f"{seq}|preempted|{rid}|{json.dumps(data, separators=(',', ':'))}")
        return entries, seq

    def idle_ttls(self, session_ttl: int) -> tuple[int, int]:
        """(meta, log) TTLs in ms of a session with nothing waiting (-1: none): what remains of the
        old ones; a fresh session TTL when the old queue held only ended requests (it had none)."""
        if self.waiting:
            return -1, -1
        meta = self.meta_pttl if self.meta_pttl > 0 else (session_ttl * 1000 if self.queue else -1)
        return meta, self.log_pttl if self.log_pttl > 0 else meta

    def describe(self, session_ttl: int) -> dict[str, Any]:
        ttl_ms = self.idle_ttls(session_ttl)[0]
        return {
            "session": self.sid, "bucket": self.bucket, "last_event_id": self.new_log()[1],
            "ttl_ms": ttl_ms if ttl_ms > 0 else None,
            "queue": [{"old": r.rid, "new": self.new_id(r.rid), "status": r.status} for r in self.waiting],
            "ended": [{"old": r.rid, "new": self.new_id(r.rid), "status": r.status, "ttl_ms": r.pttl}
                      for r in self.requests.values() if r.ended],
            "interrupted": [self.new_id(r.rid) for r in self.interrupted],
            "dropped_from_queue": self.dropped,
            "stranded": [r.rid for r in self.stranded],
        }


def ready_spec(new_rid: str, f: dict[str, str]) -> dict[str, Any]:
    """What the control plane ranks, charges and starts a waiting head by (as `ready_spec` in
    sessions/lua/includes/requests.lua builds it), with the old ready time (rs) when it had one: the
    session keeps its place among its tenant's ready sessions."""
    spec: dict[str, Any] = {"rid": new_rid, "sid": f["sid"], "tn": f["tn"], "g": f["g"], "p": _number(f["p"]),
                            "ep": _number(f.get("ep"), _number(f["p"])), "mt": _number(f["mt"]),
                            "n": _number(f.get("n")), "a": _number(f.get("a")), "it": _number(f.get("it")),
                            "sub": _number(f.get("sub")), "pc": _number(f.get("pc"))}
    if f.get("rs"):
        spec["rs"] = _number(f["rs"])
    return spec


class OldStackRunning(RuntimeError):
    """Old workers still hold live leases: the old version is running (migrating now would lose work)."""


@dataclass
class Summary:
    dry_run: bool
    sessions: int = 0
    queued: int = 0
    ended: int = 0
    interrupted: int = 0
    stranded: int = 0  # still waiting but in no session's queue: copied, cannot run
    dropped_from_queues: int = 0
    groups: list[str] = field(default_factory=list)
    quotas: int = 0
    tenant_weights: int = 0
    old_keys: int = 0
    live_old_workers: list[str] = field(default_factory=list)  # a real run refuses while there are any

    def line(self) -> str:
        return json.dumps({"summary": "migrate", **self.__dict__}, separators=(",", ":"))


class Migration:
    def __init__(self, client: Any, *, cluster: bool, lease_ms: int, session_ttl: int, dry_run: bool,
                 out: TextIO) -> None:
        self.r = client
        self.cluster = cluster
        self.scripts = Scripts(client, single_server=not cluster)
        self.lease_ms = lease_ms
        self.session_ttl = session_ttl
        self.dry_run = dry_run
        self.out = out
        self.summary = Summary(dry_run=dry_run)

    # ---- reading the old layout ----------------------------------------------------------------
    async def old_keys(self) -> list[str]:
        found: set[str] = set()
        for pattern in OLD_PATTERNS:
            async for key in self.r.scan_iter(match=pattern, count=CHUNK):
                if is_old_key(key):
                    found.add(key)
        for key in OLD_SINGLETONS:
            if await self.r.exists(key):
                found.add(key)
        return sorted(found)

    async def read_request(self, rid: str) -> OldRequest | None:
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.hgetall(OLD_REQUEST + rid)
            pipe.pttl(OLD_REQUEST + rid)
            pipe.get(OLD_REQUEST + rid + ":in")
            fields, pttl, text = await pipe.execute()
        return OldRequest(rid, fields, int(pttl), text) if fields else None

    async def read_list(self, key: str) -> list[str]:
        items: list[str] = []
        while True:
            chunk = await self.r.lrange(key, len(items), len(items) + CHUNK - 1)
            items.extend(chunk)
            if len(chunk) < CHUNK:
                return items

    async def read_session(self, sid: str, rids: set[str]) -> SessionPlan:
        base = OLD_SESSION + sid
        meta = await self.r.hgetall(base + ":m")
        queue = await self.read_list(base + ":q")
        requests = {}
        for rid in [*queue, *sorted(rids - set(queue))]:
            request = await self.read_request(rid)
            if request is not None:
                requests[rid] = request
        return SessionPlan(sid, meta, int(await self.r.pttl(base + ":m")), await self.read_list(base + ":l"),
                           int(await self.r.pttl(base + ":l")), queue, requests)

    # ---- writing the new one -------------------------------------------------------------------
    async def write_session(self, plan: SessionPlan) -> None:
        sid, bucket = plan.sid, plan.bucket
        entries, seq = plan.new_log()
        waiting = plan.waiting
        stored = list(plan.requests.values())
        uncounted = await self.uncounted(plan)
        # One transaction: every key here is in the bucket's slot.
        async with self.r.pipeline(transaction=True) as tx:
            meta_key, log_key, queue_key = keys.session_meta(sid), keys.session_log(sid), keys.session_queue(sid)
            tx.delete(meta_key)
            tx.delete(log_key)
            tx.delete(queue_key)
            meta = {**plan.meta, "seq": str(seq)}
            owner = next((r.fields["tn"] for r in stored if "tn" in r.fields), None)
            if "tn" not in meta and owner is not None:
                meta["tn"] = owner
            tx.hset(meta_key, mapping=meta)
            for i in range(0, len(entries), CHUNK):
                tx.rpush(log_key, *entries[i:i + CHUNK])
            if waiting:
                tx.rpush(queue_key, *(plan.new_id(r.rid) for r in waiting))
            meta_ttl, log_ttl = plan.idle_ttls(self.session_ttl)
            if meta_ttl > 0:
                tx.pexpire(meta_key, meta_ttl)
            if log_ttl > 0 and entries:
                tx.pexpire(log_key, log_ttl)
            for request in stored:
                self.queue_request(tx, plan.sid, request)
            self.count_depth(tx, bucket, uncounted)
            await tx.execute()

    async def uncounted(self, plan: SessionPlan) -> list[OldRequest]:
        """The requests the depth gauge is to count (every one its status says waits: queued, stranded, an
        orphan's) whose new hash is not written yet: a rerun of migrate counts none twice."""
        counted = plan.waiting + plan.stranded
        async with self.r.pipeline(transaction=False) as pipe:
            for request in counted:
                pipe.exists(keys.request(plan.new_id(request.rid)))
            existed = await pipe.execute()
        return [request for request, known in zip(counted, existed, strict=True) if not known]

    @staticmethod
    def count_depth(tx: Any, bucket: str, requests: list[OldRequest]) -> None:
        """Queue (in `tx`, with the requests' hashes) the depth gauge's +1 for each: it counts waiting
        requests from their submit on, and their cancel or end takes one off."""
        for request in requests:
            f = request.fields
            tx.hincrby(keys.data_metrics(bucket), f"depth|{f.get('g')}|{f.get('p')}|{f.get('tn')}", 1)

    def queue_request(self, tx: Any, sid: str, request: OldRequest) -> None:
        """Queue (in `tx`) the writes of a request's new hash and input."""
        new = keys.bucket_of_session(sid) + request.rid
        fields = {name: request.fields[name] for name in REQUEST_FIELDS if name in request.fields}
        if request.status == "running":  # not handed back: it resumes from its tokens so far
            fields["st"] = "preempted"
        tx.delete(keys.request(new))
        if fields:
            tx.hset(keys.request(new), mapping=fields)
        tx.delete(keys.request_input(new))
        if request.input is not None:
            tx.set(keys.request_input(new), request.input)
        if request.ended and request.pttl > 0:
            tx.pexpire(keys.request(new), request.pttl)
            if request.input is not None:
                tx.pexpire(keys.request_input(new), request.pttl)

    def alias_ttl_ms(self, request: OldRequest) -> int:
        """An alias ends (no one deletes it): with its request when that keeps a TTL (an ended one, see
        queue_request), else after ALIAS_RETENTION or the session TTL, the longer (a waiting one has none
        until it ends)."""
        if request.ended and request.pttl > 0:
            return request.pttl
        return max(ALIAS_RETENTION, self.session_ttl) * 1000

    async def write_aliases(self, sid: str, requests: list[OldRequest]) -> None:
        async with self.r.pipeline(transaction=False) as pipe:
            for request in requests:
                pipe.set(keys.alias(request.rid), keys.bucket_of_session(sid) + request.rid,
                         px=self.alias_ttl_ms(request))
            await pipe.execute()

    async def ready_head(self, plan: SessionPlan) -> None:
        waiting = plan.waiting
        if not waiting:
            return
        head = waiting[0]
        spec = ready_spec(plan.new_id(head.rid), {**head.fields, "sid": plan.sid})
        await self.fcall("ready", [keys.group_prefix(spec["g"])], [self.lease_ms, json.dumps(spec)])

    async def fcall(self, name: str, keys_: list[str], args: list[Any]) -> Any:
        """A library call (Scripts loads the library where a server lacks it)."""
        return await self.scripts.call(name, keys_, args)

    async def delete(self, names: list[str]) -> None:
        for i in range(0, len(names), CHUNK):
            async with self.r.pipeline(transaction=False) as pipe:
                for name in names[i:i + CHUNK]:
                    pipe.delete(name)  # one key a command: old keys are in any slot of a cluster
                await pipe.execute()

    # ---- the whole run -------------------------------------------------------------------------
    async def groups_and_quotas(self, old: list[str], group_of_requests: set[str]) -> None:
        quota_groups = {key[len(OLD_GROUP):].split(":", 1)[0] for key in old
                        if key.startswith(OLD_GROUP) and key.endswith(":cfg") and key.count(":") == 3}
        groups = sorted({*await self.r.smembers(keys.GROUPS), *group_of_requests, *quota_groups})
        self.summary.groups = groups
        self.summary.tenant_weights = await self.r.hlen(keys.TENANT_WEIGHTS)
        for group in groups:
            cfg = {}
            if await self.r.type(OLD_GROUP + group + ":cfg") == "hash":
                cfg = await self.r.hgetall(OLD_GROUP + group + ":cfg")
            self.summary.quotas += bool(cfg)
            if self.dry_run:
                continue
            await register_group(self.r, group)
            await copy_policy(self.r, group)  # also for a group the old sg:groups already listed
            if cfg:
                await self.r.hset(keys.group_key(group, "cfg"), mapping=cfg)

    async def run(self) -> Summary:
        old = await self.old_keys()
        self.summary.old_keys = len(old)
        if not old:
            return self.summary
        await self.check_stopped(old)
        sids = {key[len(OLD_SESSION):-2] for key in old
                if key.startswith(OLD_SESSION) and key[-2:] in (":m", ":q", ":l")}
        rids = sorted({key[len(OLD_REQUEST):].removesuffix(":in") for key in old if key.startswith(OLD_REQUEST)})
        by_session: dict[str, set[str]] = {}  # a session's requests, queued or ended (found by their sid)
        groups: set[str] = set()
        for i in range(0, len(rids), CHUNK):
            async with self.r.pipeline(transaction=False) as pipe:
                for rid in rids[i:i + CHUNK]:
                    pipe.hmget(OLD_REQUEST + rid, ["sid", "g"])
                replies = await pipe.execute()
            for rid, (sid, group) in zip(rids[i:i + CHUNK], replies, strict=True):
                if sid is not None:
                    by_session.setdefault(sid, set()).add(rid)
                if group:
                    groups.add(group)
        await self.groups_and_quotas(old, groups)
        for sid in sorted(sids | set(by_session)):
            plan = await self.read_session(sid, by_session.get(sid, set()))
            await self.move(plan, orphan=sid not in sids)
        if not self.dry_run:
            await self.delete(await self.old_keys())  # the old control plane, workers, metrics, leftovers
        return self.summary

    async def check_stopped(self, old: list[str]) -> None:
        """An old worker renews its liveness key (sg:w:<wid>, a PX lease) while it runs; one that was
        stopped deleted it, one that died lets it lapse within a lease."""
        workers = [key for key in old if key.startswith(keys.PREFIX + "w:") and not key.endswith(":in")]
        for key in workers:
            if await self.r.type(key) == "string" and await self.r.pttl(key) > 0:
                self.summary.live_old_workers.append(key.removeprefix(keys.PREFIX + "w:"))
        if self.summary.live_old_workers and not self.dry_run:
            raise OldStackRunning(f"old workers are still running ({', '.join(self.summary.live_old_workers)}): "
                                  "stop the old API, scheduler and workers first (a worker that died is "
                                  "forgotten within its lease, a few seconds)")

    async def move(self, plan: SessionPlan, *, orphan: bool) -> None:
        s = self.summary
        waiting = plan.waiting
        s.sessions += not orphan
        s.stranded += len(plan.stranded)
        s.queued += len(waiting)
        s.ended += sum(r.ended for r in plan.requests.values())
        s.interrupted += len(plan.interrupted)
        s.dropped_from_queues += len(plan.dropped)
        if self.dry_run:
            self.out.write(json.dumps(plan.describe(self.session_ttl), separators=(",", ":")) + "\n")
            return
        requests = list(plan.requests.values())
        if orphan:  # request hashes whose session is gone: kept for lookups, nothing to run or stream
            uncounted = await self.uncounted(plan)  # (all stranded: an orphan is in no queue)
            async with self.r.pipeline(transaction=True) as tx:  # one slot: the session's bucket
                for request in requests:
                    self.queue_request(tx, plan.sid, request)
                self.count_depth(tx, plan.bucket, uncounted)
                await tx.execute()
        else:
            await self.write_session(plan)
        await self.write_aliases(plan.sid, requests)
        if not orphan:
            await self.ready_head(plan)
        old = [OLD_SESSION + plan.sid + suffix for suffix in (":m", ":q", ":l")]
        old += [OLD_REQUEST + rid + suffix for rid in plan.requests for suffix in ("", ":in")]
        await self.delete(old)


# The settings' defaults, for callers that name none (the CLI passes its settings'): never a copy of them.
DEFAULT_LEASE_MS = int(Settings.model_fields["lease_seconds"].default * 1000)
DEFAULT_SESSION_TTL = int(Settings.model_fields["session_ttl"].default)


async def migrate_async(redis_url: str, *, cluster: bool = False, dry_run: bool = False,
                        lease_ms: int = DEFAULT_LEASE_MS, session_ttl: int = DEFAULT_SESSION_TTL,
                        out: TextIO | None = None) -> Summary:
    client = async_client(redis_url, cluster=cluster, decode_responses=True)
    try:
        migration = Migration(client, cluster=cluster, lease_ms=lease_ms, session_ttl=session_ttl,
                              dry_run=dry_run, out=out or sys.stdout)
        summary = await migration.run()
    finally:
        await client.aclose()
    (out or sys.stdout).write(summary.line() + "\n")
    return summary


def migrate(redis_url: str, **options: Any) -> Summary:
    """Run the migration (see the module docstring); returns its summary, which it also prints."""
    return asyncio.run(migrate_async(redis_url, **options))


def main(settings: Settings, *, dry_run: bool) -> int:
    """`sluicegate migrate`: exit code 0; 1 when Redis cannot be used or the old version still runs;
    2 without --redis-url."""
    if not settings.redis_url:
        print("sluicegate migrate: --redis-url is required (the Redis of the deployment to migrate)", file=sys.stderr)
        return 2
    try:
        check_redis(settings.redis_url, cluster=settings.redis_cluster)
    except RedisUnavailable as error:
        print(f"sluicegate migrate: {error}", file=sys.stderr)
        return 1
    try:
        migrate(settings.redis_url, cluster=settings.redis_cluster, dry_run=dry_run,
                lease_ms=int(settings.lease_seconds * 1000), session_ttl=settings.session_ttl)
    except OldStackRunning as error:
        print(f"sluicegate migrate: {error}; nothing was changed", file=sys.stderr)
        return 1
    return 0
