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
   (an idle session and its ended requests keep what remains of theirs, queued work has none); and
   the session's mark `sg:{s:<bucket>}:migrated:<sid>` (migrated_mark: its last event id, no TTL), which
   outlives the new session: step 4 deletes it with the old keys;
2. the aliases;
3. the session's head made ready on its group's control plane (the library's `ready` function);
4. the session's old keys deleted, unless an old API wrote to it since it was read (see delete_session):
   one transaction, with that check, on the one server the old layout ran on, so a death leaves all of
   them or none.

Step 1 writes no key the new layout already has: a session whose new meta, log or queue exists is taken
as written when they are exactly what this session's step 1 writes (an earlier run died before step 4),
else it is left alone, old keys and all (the new version wrote the same session id, or ran the migrated
session on since: rewriting it would lose its events and hand their ids out again), and the run ends
with exit code 1 and a line for it. Likewise a request hash the new layout holds, changed, and a session
whose mark is there but whose new keys are not (the new version ran it and it expired since: rewriting it
would run its ended requests again). A key of the old layout with another type than the layout gives it is
a line too (kept, not read). A run a Redis error stops says so, exit code 1: run it again.

Before the sessions, and also when none is left (an idle session expires while the old stack is stopped):
each group is registered with its copies of `sg:policy` and `sg:tenants` and its quota settings
(`sg:g:<G>:cfg`, which the sweep deletes). An old API not yet stopped may write sessions while migrate runs:
each pass moves what the scan before it found, until a scan finds none (at most MAX_PASSES; what is left is
reported, kept, exit code 1). Then every other old key is deleted (the old control plane: ready sets,
counters, runs, leases, workers, metrics). Dying half-way and running it again is harmless (a session is
redone until its old keys are gone), and a second run finds nothing to do. One run at a time: a second
refuses while the first holds the run lock (LOCK; it lapses when a run dies); a run that cannot renew it
in time stops at its next session, or before the sweep.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from redis.exceptions import RedisError, ResponseError, WatchError

from sluicegate.sessions import keys
from sluicegate.sessions.callbacks import script  # sessions/lua/standalone/<name>.lua
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


def old_session_keys(sid: str) -> list[str]:
    """A session's keys in the old layout: its meta, queue and log."""
    return [OLD_SESSION + sid + suffix for suffix in (":m", ":q", ":l")]


def old_request_keys(rids: Any) -> list[str]:
    """The old layout's keys of these requests: each one's hash and input."""
    return [OLD_REQUEST + rid + suffix for rid in rids for suffix in ("", ":in")]


def is_old_key(key: str) -> bool:
    """A key of the old layout (the new one's keys start with `sg:{`; sg:groups, sg:tenants, sg:policy,
    sg:keys keep their names and are not old keys)."""
    if key.startswith(keys.PREFIX + "{"):
        return False
    return key in OLD_SINGLETONS or any(key.startswith(p[:-1]) for p in OLD_PATTERNS)


def new_request_id(sid: str, old_rid: str) -> str:
    return keys.bucket_of_session(sid) + old_rid


def migrated_mark(sid: str) -> str:
    """String, in the session's bucket (step 1 writes it in its transaction): the session's last event id
    when migrate moved it. No TTL: it must outlive the new session, which may run on and expire while the old
    keys stay (a run died in step 4, or an old API wrote to them): a rerun that finds it and no new session
    leaves the old keys alone. Step 4 deletes it with them; a real run deletes those of sessions with no
    old keys (deleted by hand)."""
    return f"{keys.session_prefix(sid)}migrated:{sid}"


MARKS = keys.PREFIX + "{s:*}:migrated:*"  # every session's mark (a SCAN pattern: braces are literal)


def wrong_type(error: object) -> bool:
    """A command met a key of another type than it works on (WRONGTYPE)."""
    return isinstance(error, ResponseError) and str(error).startswith("WRONGTYPE")


async def execute(pipe: Any) -> list[Any]:
    """Run a pipeline; its first error raised as the server sent it (redis-py's own annotation of a
    pipeline's error loses the server's message)."""
    replies = await pipe.execute(raise_on_error=False)
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return list(replies)


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
    if f.get("fs"):  # its `queued` event's id: a ready of a later head of the session wins over it
        spec["fs"] = _number(f["fs"])
    if f.get("rs"):
        spec["rs"] = _number(f["rs"])
    return spec


class OldStackRunning(RuntimeError):
    """Old workers still hold live leases: the old version is running (migrating now would lose work)."""


def old_stack_running(workers: list[str]) -> str:
    """Why a run refuses (and a dry run warns) while old workers hold live leases."""
    return (f"old workers are still running ({', '.join(workers)}): stop the old API, scheduler and workers "
            "first (a worker that died is forgotten within its lease, a few seconds); nothing was changed")


class MigrationLocked(RuntimeError):
    """Another run of migrate holds the run lock (two at once would count the queue depth twice)."""


# The run lock: `SET LOCK <run id> NX PX LOCK_MS`, renewed every third of LOCK_MS while the run lasts, deleted
# at its end; a run that dies leaves it to lapse. Not an old key (is_old_key): no sweep deletes it.
LOCK = keys.PREFIX + "migrate-lock"
LOCK_MS = 30_000
RENEW_LOCK = script("migrate_lock_renew")
RELEASE_LOCK = script("migrate_lock_release")
# Passes over the old layout: a session or request an old API still writes while migrate runs is moved by
# the next one; what is still there after the last is reported and kept.
MAX_PASSES = 5
WRITE_TRIES = 3  # a session's write is retried when a watched key changed between its check and its write
# A field step 4 sets in a session's old meta before deleting its keys one by one (a cluster, see
# delete_session): a rerun that finds it finishes the deletes rather than compare a half-deleted session.
MOVED = "migrated"


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
    conflicts: dict[str, str] = field(default_factory=dict)  # session -> why it was left alone (old keys kept)
    unmigrated: list[str] = field(default_factory=list)  # sessions still written in the old layout after the passes
    wrong_type: list[str] = field(default_factory=list)  # old request keys of another type: not read, kept

    def line(self) -> str:
        return json.dumps({"summary": "migrate", **self.__dict__}, separators=(",", ":"))

    def problems(self) -> list[str]:
        """One line for each session left in the old layout (and for a dry run's live old workers, which
        make a real run refuse): a run with any ends with exit code 1."""
        lines = [old_stack_running(self.live_old_workers)] if self.dry_run and self.live_old_workers else []
        lines += [f"session {sid!r} not migrated: {why}; its old keys (sg:s:{sid}:m|q|l, its requests' sg:r:<id>) "
                 "are kept: check the session, then delete them by hand" for sid, why in self.conflicts.items()]
        if self.unmigrated:
            lines.append(f"{len(self.unmigrated)} session(s) still written in the old layout after {MAX_PASSES} "
                         f"passes (is an old API still running?), their old keys kept: "
                         f"{', '.join(self.unmigrated[:10])}")
        lines += [f"{key} is not a hash, as the old layout's request keys are: not read, kept: check it, then "
                  "delete it by hand" for key in self.wrong_type]
        return lines


@dataclass
class Found:
    """What the new layout holds of a plan's session and requests."""
    meta: dict[str, str]
    queue: list[str]
    log_length: int
    last_entry: str | None
    hashes: list[dict[str, str]]  # each stored request's new hash ({}: none), in plan.requests' order
    mark: str | None = None  # migrated_mark: the last event id when a run moved the session, or None


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
        self.run_id = secrets.token_hex(8)
        self.lock_lost = False
        self.lock_renewed = 0.0  # time.monotonic() before the last lock write that succeeded
        self.groups_done: set[str] = set()

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
            fields, pttl, text = await execute(pipe)
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

    # ---- what the new layout already holds -------------------------------------------------------
    @staticmethod
    def new_meta(plan: SessionPlan, seq: int) -> dict[str, str]:
        meta = {**plan.meta, "seq": str(seq)}
        owner = next((r.fields["tn"] for r in plan.requests.values() if "tn" in r.fields), None)
        if "tn" not in meta and owner is not None:
            meta["tn"] = owner
        return meta

    @staticmethod
    def new_fields(request: OldRequest) -> dict[str, str]:
        """A request's new hash."""
        fields = {name: request.fields[name] for name in REQUEST_FIELDS if name in request.fields}
        if request.status == "running":  # not handed back: it resumes from its tokens so far
            fields["st"] = "preempted"
        return fields

    async def read_new(self, plan: SessionPlan) -> Found:
        sid = plan.sid
        async with self.r.pipeline(transaction=False) as pipe:  # one slot: the session's bucket
            pipe.hgetall(keys.session_meta(sid))
            pipe.lrange(keys.session_queue(sid), 0, -1)
            pipe.llen(keys.session_log(sid))
            pipe.lindex(keys.session_log(sid), -1)
            pipe.get(migrated_mark(sid))
            for request in plan.requests.values():
                pipe.hgetall(keys.request(plan.new_id(request.rid)))
            meta, queue, length, last, mark, *hashes = await execute(pipe)
        return Found(meta, queue, int(length), last, hashes, mark)

    def conflict(self, plan: SessionPlan, found: Found, *, orphan: bool) -> tuple[str | None, bool]:
        """(why the plan must not be written, or None; whether an earlier run already wrote it all).

        The new version may have written the same session id (it was started before migrate), or run the
        migrated session on after a run of migrate died before deleting its old keys: rewriting it would
        lose its new requests and events and hand out its event ids again. Only what this plan would write
        itself (an earlier run's step 1, one transaction) counts as written. A session an earlier run moved
        (its mark) of which the new layout holds nothing ended there since (the new version ran it, and it
        expired): rewriting it would run its requests again."""
        if not orphan and (found.meta or found.queue or found.log_length):
            entries, seq = plan.new_log()
            if (found.meta == self.new_meta(plan, seq) and found.queue == [plan.new_id(r.rid) for r in plan.waiting]
                    and found.log_length == len(entries) and found.last_entry == (entries[-1] if entries else None)):
                return None, True
            return (f"the new layout already holds it (last event id {found.meta.get('seq', '?')}, "
                    f"{len(found.queue)} queued), not as migrate writes it"), False
        if not orphan and found.mark is not None:
            return (f"an earlier run of migrate moved it (last event id {found.mark}) and the new layout no "
                    "longer holds it (the new version ran it, and it expired): rewriting it would run its "
                    "requests again and hand its event ids out again"), False
        for request, now in zip(plan.requests.values(), found.hashes, strict=True):
            if now and now != self.new_fields(request):
                return f"the new layout already holds request {plan.new_id(request.rid)!r}, changed since", False
        return None, False

    # ---- writing the new one -------------------------------------------------------------------
    async def write(self, plan: SessionPlan, *, orphan: bool) -> str | None:
        """Step 1 for a session (or an orphan's requests), unless the new layout holds something else there:
        then nothing is written and the reason is returned. The keys checked are watched until the write
        (one transaction, one slot: the bucket's)."""
        sid = plan.sid
        stored = list(plan.requests.values())
        watched = [keys.request(plan.new_id(r.rid)) for r in stored]
        if not orphan:
            watched += [keys.session_meta(sid), keys.session_log(sid), keys.session_queue(sid), migrated_mark(sid)]
        for _ in range(WRITE_TRIES):
            try:
                async with self.r.pipeline(transaction=True) as tx:
                    await tx.watch(*watched)
                    found = await self.read_new(plan)
                    why, written = self.conflict(plan, found, orphan=orphan)
                    if why or written:
                        return why
                    absent = {r.rid for r, now in zip(stored, found.hashes, strict=True) if not now}
                    tx.multi()
                    if not orphan:
                        self.queue_session(tx, plan)
                    for request in stored:
                        if request.rid in absent:  # an existing one is this very hash (see conflict)
                            self.queue_request(tx, plan.sid, request)
                    counted = [r for r in plan.waiting + plan.stranded if r.rid in absent]
                    self.count_depth(tx, plan.bucket, counted)
                    await tx.execute()
                    return None
            except WatchError:
                continue
        return "the new layout's keys of the session kept changing while migrate wrote them"

    def queue_session(self, tx: Any, plan: SessionPlan) -> None:
        """Queue (in `tx`) the writes of the session's meta, log and queue (none of them exists)."""
        sid = plan.sid
        entries, seq = plan.new_log()
        meta_key, log_key, queue_key = keys.session_meta(sid), keys.session_log(sid), keys.session_queue(sid)
        tx.hset(meta_key, mapping=self.new_meta(plan, seq))
        for i in range(0, len(entries), CHUNK):
            tx.rpush(log_key, *entries[i:i + CHUNK])
        if plan.waiting:
            tx.rpush(queue_key, *(plan.new_id(r.rid) for r in plan.waiting))
        meta_ttl, log_ttl = plan.idle_ttls(self.session_ttl)
        if meta_ttl > 0:
            tx.pexpire(meta_key, meta_ttl)
        if log_ttl > 0 and entries:
            tx.pexpire(log_key, log_ttl)
        tx.set(migrated_mark(sid), seq)

    @staticmethod
    def count_depth(tx: Any, bucket: str, requests: list[OldRequest]) -> None:
        """Queue (in `tx`, with the requests' hashes) the depth gauge's +1 for each: it counts waiting
        requests from their submit on, and their cancel or end takes one off. Only requests whose hash this
        transaction writes are counted: a rerun of migrate counts none twice."""
        for request in requests:
            f = request.fields
            tx.hincrby(keys.data_metrics(bucket), f"depth|{f.get('g')}|{f.get('p')}|{f.get('tn')}", 1)

    def queue_request(self, tx: Any, sid: str, request: OldRequest) -> None:
        """Queue (in `tx`) the writes of a request's new hash and input (neither exists)."""
        new = keys.bucket_of_session(sid) + request.rid
        fields = self.new_fields(request)
        if fields:
            tx.hset(keys.request(new), mapping=fields)
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
        """Delete keys one a command (old keys are in any slot of a cluster): not atomic."""
        for i in range(0, len(names), CHUNK):
            async with self.r.pipeline(transaction=False) as pipe:
                for name in names[i:i + CHUNK]:
                    pipe.delete(name)  # one key a command: old keys are in any slot of a cluster
                await pipe.execute()

    async def delete_session(self, plan: SessionPlan, *, orphan: bool) -> bool:
        """Step 4: the session's old keys and its requests', unless an old API still running wrote to the
        session since it was read (every write adds an event to its log): then nothing is deleted and it
        returns False (the new layout has the session as read; the old keys keep what came after).

        The old layout ran on one server (its scripts take keys of many slots): there the check and the
        deletes are one transaction (WATCH), so a submit landing between them is kept, and a run that dies
        leaves all the keys or none (half of them would read as another session on a rerun). On a cluster
        (old keys copied there: no old API can write to one) the keys go one a command: the meta is marked
        MOVED first and deleted last, and a rerun that finds the mark finishes the deletes (finish_delete)."""
        base = OLD_SESSION + plan.sid
        session = [] if orphan else old_session_keys(plan.sid)
        requests = old_request_keys(plan.requests)
        mark = [] if orphan else [migrated_mark(plan.sid)]
        if self.cluster:
            if not orphan:
                if await self.r.llen(base + ":l") != len(plan.log):
                    return False
                await self.r.hset(base + ":m", MOVED, self.run_id)
            await self.finish_delete(plan)
            return True
        for _ in range(WRITE_TRIES):
            try:
                async with self.r.pipeline(transaction=True) as tx:
                    if session:
                        await tx.watch(*session)
                        if await tx.llen(base + ":l") != len(plan.log):
                            return False
                    tx.multi()
                    if session or requests:
                        tx.delete(*session, *requests, *mark)
                    await tx.execute()
                    return True
            except WatchError:  # written since the check: checked again
                continue
        return False

    async def finish_delete(self, plan: SessionPlan) -> None:
        """The deletes of step 4, one key a command, the old meta (with its MOVED mark) last, then the
        session's migrated_mark (once no old key of it is left to rewrite it from)."""
        base = OLD_SESSION + plan.sid
        await self.delete([base + ":q", base + ":l", *old_request_keys(plan.requests)])
        await self.delete([base + ":m"])
        await self.delete([migrated_mark(plan.sid)])

    # ---- the run lock --------------------------------------------------------------------------
    async def lock(self) -> None:
        self.lock_renewed = time.monotonic()
        if not await self.r.set(LOCK, self.run_id, nx=True, px=LOCK_MS):
            raise MigrationLocked(f"another run of migrate holds its lock ({LOCK}, run "
                                  f"{await self.r.get(LOCK)}): wait for it to end (a run that died lets the "
                                  f"lock lapse within {LOCK_MS / 1000:g} s); nothing was changed")

    async def hold_lock(self) -> None:
        """Renew the lock while the run lasts. A renewal that fails (a dropped connection) is tried again at
        the next; the lock is lost when a renewal finds it no longer this run's (the run stalled past its TTL),
        or once LOCK_MS has passed since the last renewal that succeeded (it may have lapsed): the run then
        stops at its next session, or before its sweep, rather than run alongside another."""
        while not self.lock_lost:
            await asyncio.sleep(LOCK_MS / 3000)
            sent = time.monotonic()
            try:
                held = bool(await self.r.eval(RENEW_LOCK, 1, LOCK, self.run_id, LOCK_MS))
            except (RedisError, OSError):
                held = time.monotonic() - self.lock_renewed < LOCK_MS / 1000
            else:
                self.lock_renewed = sent
            self.lock_lost = not held

    def check_lock(self) -> None:
        if self.lock_lost:
            raise MigrationLocked(f"migrate lost its lock ({LOCK}) and stopped half-way: run it again")

    async def unlock(self) -> None:
        await self.r.eval(RELEASE_LOCK, 1, LOCK, self.run_id)

    # ---- the whole run -------------------------------------------------------------------------
    async def groups_and_quotas(self, old: list[str], group_of_requests: set[str]) -> None:
        quota_groups = {key[len(OLD_GROUP):].split(":", 1)[0] for key in old
                        if key.startswith(OLD_GROUP) and key.endswith(":cfg") and key.count(":") == 3}
        groups = sorted({*await self.r.smembers(keys.GROUPS), *group_of_requests, *quota_groups} - self.groups_done)
        self.groups_done.update(groups)
        self.summary.groups = sorted(self.groups_done)
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
            if cfg and not await self.r.exists(keys.group_key(group, "cfg")):  # a rerun keeps the new version's
                await self.r.hset(keys.group_key(group, "cfg"), mapping=cfg)

    async def sessions_in(self, old: list[str]) -> tuple[set[str], dict[str, set[str]], set[str]]:
        """In a scan of the old keys: the sessions with old session keys, each session's old requests
        (queued or ended, found by their sid) and the groups they name."""
        sids = {key[len(OLD_SESSION):-2] for key in old
                if key.startswith(OLD_SESSION) and key[-2:] in (":m", ":q", ":l")}
        rids = sorted({key[len(OLD_REQUEST):].removesuffix(":in") for key in old if key.startswith(OLD_REQUEST)})
        by_session: dict[str, set[str]] = {}
        groups: set[str] = set()
        for i in range(0, len(rids), CHUNK):
            async with self.r.pipeline(transaction=False) as pipe:
                for rid in rids[i:i + CHUNK]:
                    pipe.hmget(OLD_REQUEST + rid, ["sid", "g"])
                replies = await pipe.execute(raise_on_error=False)
            for rid, reply in zip(rids[i:i + CHUNK], replies, strict=True):
                if wrong_type(reply):  # not a request: reported and kept, not read
                    if OLD_REQUEST + rid not in self.summary.wrong_type:
                        self.summary.wrong_type.append(OLD_REQUEST + rid)
                    continue
                if isinstance(reply, Exception):
                    raise reply
                sid, group = reply
                if sid is not None:
                    by_session.setdefault(sid, set()).add(rid)
                if group:
                    groups.add(group)
        return sids, by_session, groups

    async def run(self) -> Summary:
        if self.dry_run:
            return await self.passes()
        await self.lock()
        holder = asyncio.create_task(self.hold_lock())
        try:
            return await self.passes()
        finally:
            holder.cancel()
            await asyncio.gather(holder, return_exceptions=True)
            await self.unlock()

    async def passes(self) -> Summary:
        """Move every session, then sweep the old control plane. An old API not yet stopped may still write
        sessions and requests: each pass moves what the last scan found; the sweep deletes no key of a
        session still to move (or left alone: a conflict), only the old control plane, global keys and
        request keys of no session."""
        old = await self.old_keys()
        self.summary.old_keys = len(old)
        if not old:
            if not self.dry_run:
                await self.sweep_marks(set())
            return self.summary
        await self.check_stopped(old)
        await self.groups_and_quotas(old, set())  # also when no session is left (the sweep deletes the old cfg)
        for done in range(MAX_PASSES + 1):
            sids, by_session, groups = await self.sessions_in(old)
            todo = sorted((sids | set(by_session)) - set(self.summary.conflicts))
            if not todo or done == MAX_PASSES or (self.dry_run and done):
                break
            await self.groups_and_quotas(old, groups)
            for sid in todo:
                self.check_lock()
                try:
                    plan = await self.read_session(sid, by_session.get(sid, set()))
                    await self.move(plan, orphan=sid not in sids)
                except ResponseError as error:
                    if not wrong_type(error):
                        raise
                    self.summary.conflicts[sid] = f"a key of it is not of the type the old layout gives it ({error})"
            if not self.dry_run:
                old = await self.old_keys()
        if self.dry_run:
            return self.summary
        self.summary.unmigrated = todo
        kept = set(todo) | set(self.summary.conflicts)
        keep = {key for sid in kept for key in [*old_session_keys(sid), *old_request_keys(by_session.get(sid, ()))]}
        keep.update(old_request_keys(key.removeprefix(OLD_REQUEST) for key in self.summary.wrong_type))
        self.check_lock()
        await self.delete([key for key in old if key not in keep])  # the old control plane, workers, metrics
        await self.sweep_marks(kept)
        return self.summary

    async def sweep_marks(self, kept: set[str]) -> None:
        """Delete the migrated_mark of every session whose old keys are gone (step 4 deletes its own; this
        catches those of old keys deleted by hand, and of a run that died between the two): no rerun can
        rewrite such a session. The marks of the sessions left in the old layout (`kept`) stay."""
        marks = [key async for key in self.r.scan_iter(match=MARKS, count=CHUNK)]
        stale = [key for key in marks if key.split(":migrated:", 1)[1] not in kept]
        for key in stale:  # a session written in the old layout since the passes' last scan keeps its mark
            if not any([await self.r.exists(old) for old in old_session_keys(key.split(":migrated:", 1)[1])]):
                await self.r.delete(key)

    async def check_stopped(self, old: list[str]) -> None:
        """An old worker renews its liveness key (sg:w:<wid>, a PX lease) while it runs; one that was
        stopped deleted it, one that died lets it lapse within a lease."""
        workers = [key for key in old if key.startswith(keys.PREFIX + "w:") and not key.endswith(":in")]
        for key in workers:
            if await self.r.type(key) == "string" and await self.r.pttl(key) > 0:
                self.summary.live_old_workers.append(key.removeprefix(keys.PREFIX + "w:"))
        if self.summary.live_old_workers and not self.dry_run:
            raise OldStackRunning(old_stack_running(self.summary.live_old_workers))

    async def move(self, plan: SessionPlan, *, orphan: bool) -> None:
        if MOVED in plan.meta:  # moved by a run that died in step 4 on a cluster: only deletes are left
            self.summary.sessions += 1
            if self.dry_run:
                self.out.write(json.dumps({"session": plan.sid, "moved_by_an_earlier_run": True},
                                         separators=(",", ":")) + "\n")
            else:
                await self.finish_delete(plan)
            return
        if self.dry_run:
            why, _ = self.conflict(plan, await self.read_new(plan), orphan=orphan)
        else:
            why = await self.write(plan, orphan=orphan)
        if why:  # left alone, old keys and all
            self.summary.conflicts[plan.sid] = why
            return
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
        await self.write_aliases(plan.sid, requests)
        if not orphan:
            await self.ready_head(plan)
        if not await self.delete_session(plan, orphan=orphan):
            self.summary.conflicts[plan.sid] = ("written in the old layout while migrate moved it (is an old API "
                                                "still running?)")


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
    """`sluicegate migrate`: exit code 0; 1 when Redis cannot be used or fails part-way, the old version still
    runs (a dry run too: the real run would refuse), another run holds the lock, or a session or key was left
    in the old layout (a conflict, still being written, a key of another type); 2 without --redis-url."""
    if not settings.redis_url:
        print("sluicegate migrate: --redis-url is required (the Redis of the deployment to migrate)", file=sys.stderr)
        return 2
    try:
        check_redis(settings.redis_url, cluster=settings.redis_cluster)
    except RedisUnavailable as error:
        print(f"sluicegate migrate: {error}", file=sys.stderr)
        return 1
    try:
        summary = migrate(settings.redis_url, cluster=settings.redis_cluster, dry_run=dry_run,
                          lease_ms=int(settings.lease_seconds * 1000), session_ttl=settings.session_ttl)
    except (OldStackRunning, MigrationLocked) as error:
        print(f"sluicegate migrate: {error}", file=sys.stderr)
        return 1
    except (RedisError, OSError) as error:  # a dropped connection, a failover, a key it cannot use
        print(f"sluicegate migrate: the store failed part-way ({type(error).__name__}: {error}): run it again "
              "(each step is idempotent)", file=sys.stderr)
        return 1
    for problem in summary.problems():
        print(f"sluicegate migrate: {problem}", file=sys.stderr)
    return 1 if summary.problems() else 0
