"""The state changes of a request, each as the library calls it takes (README, "Growing past one Redis").

A transition that touches both planes (submit readies a session; a dispatch starts a request; a finish
frees a slot and readies the session's next request; a preemption fences a run) is one call on one
server (the single-server functions), and on a cluster one call per plane, each in the slot of its
plane, each idempotent, in an order that loses nothing when the caller dies between them:

    submit:  data submit (head noted in the bucket's outbox)  ->  control ready (+ dispatch)
    start:   control dispatch (run record, lease, inbox)      ->  data start (worker: `started`, fence)
    finish:  data finish (next head noted in the outbox)      ->  control release  ->  control ready (next)
    stop:    data handback (fence, `preempted`)               ->  control release (requeue)
    cancel:  data cancel (next head noted in the outbox)      ->  control withdraw  ->  control ready (next)

What a dead caller leaves half-done is finished by the scheduler: a head in an outbox is readied
again by the repair pass (`repair`), a run whose worker stopped renewing its lease is handed back and
released by the sweep (`sweep`). Every method here is a coroutine; with redis-py's synchronous client
(tests, tools) it never suspends, and `run_sync` drives it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sluicegate.sessions import keys
from sluicegate.sessions.connect import never_sent, store_refuses, store_unavailable, text
from sluicegate.sessions.requests import NewRequest
from sluicegate.sessions.scripts import Scripts
from sluicegate.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
HEARTBEAT_CHUNK = 64  # runs renewed per heartbeat call (heartbeat)
LOG_HEADER = 4  # read_log's reply: last id, oldest kept id, holes, owner; then the entries
# The worker inbox entries this code reads (sessions/runs.py, Assignment), declared when a worker
# registers: 2 adds "|reason" to a cluster's entry. A dispatcher sends that suffix only to a worker that
# declared it, so in a rolling upgrade an older worker never gets an entry it would misread.
INBOX_FORMAT = 2
MAX_ATTEMPTS: int = Settings.model_fields["max_attempts"].default
LOG_MAX_EVENTS: int = Settings.model_fields["session_log_max_events"].default


async def settled(value: Any) -> Any:
    """A reply, whether a blocking client gave it or an asyncio one promised it."""
    return await value if hasattr(value, "__await__") else value


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a transition over a synchronous client (its calls return at once, so it never suspends)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a transition over a synchronous client suspended")


@dataclass(frozen=True)
class Tail:
    """A run's last tokens, which its end appends (`finish(tail=...)`): `data` is each token's event data
    (JSON), the first at `first_index`; `engine_times` as `append`'s, when they are the request's first."""

    first_index: int
    data: Sequence[str]
    engine_times: tuple[float, float, float] | None = None


def engine_times_arg(engine_times: tuple[float, float, float] | None) -> str:
    """The worker's took|called|first times (ms) as the scripts take them, "" when not given."""
    return "|".join(f"{t:.3f}" for t in engine_times) if engine_times else ""


LEASE_PUSH_BACK_MS = 1000  # a lost run whose hand-back failed is due again this much later
LOST_NOTE_MARGIN_MS = 1000  # a fail deadline noted after a lost submit answer, on this host's clock: this much later


@dataclass
class EndProgress:
    """How far one run's end (finish or hand-back) on a cluster got, kept by its caller across its retries: a
    retry takes up from the control step that failed, with the data step's first reply. A data step whose reply
    was lost (no reply kept) is sent again: the data plane refuses it (the request ended by this very end), but
    its reply carries the first one's counts, the backend's prompt count and the session's waiting head
    (requests.lua `ended_by`)."""

    reply: Any = None
    released: bool = False


class MaybeStored(Exception):
    """A submit whose call went out twice with no answer (the connection lost each time): it may have been
    stored, and then runs. A caller told to retry would store and generate it a second time."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"the submit of {request_id} got no answer: it may have been stored")
        self.request_id = request_id


@dataclass(frozen=True)
class Offer:
    """What a worker's offer of its slots did: requests dispatched into them, and the excess: its runs and
    waiting assignments that hold a ticket past its slots (they shrank), whose ends must give none back."""

    started: int
    excess: int


@dataclass(frozen=True)
class SweepResult:
    lapsed: int
    promoted: int
    started: int
    next_wake_ms: float  # -1: none
    now_ms: float


class Transitions:
    def __init__(self, scripts: Scripts, *, lease_ms: int, session_ttl: int, max_attempts: int = MAX_ATTEMPTS,
                 log_max_events: int = LOG_MAX_EVENTS) -> None:
        """`log_max_events` (--session-log-max-events) bounds each session's log. Only submit passes it:
        the function stores it in the session's meta, where every later call that appends to the log
        reads it (sessions/lua/includes/call.lua, trim_log), so the workers' and the scheduler's calls
        need no setting of their own and a session keeps the cap its last submit gave it."""
        self.scripts = scripts
        self.single = scripts.single_server
        self.lease_ms = lease_ms
        self.ttl = session_ttl
        self.max_attempts = max_attempts
        self.log_max_events = log_max_events

    async def _call(self, name: str, keys_: Sequence[Any], args: Sequence[Any]) -> Any:
        return await settled(self.scripts.call(name, keys_, args))

    async def _ready(self, spec_json: Any) -> str:
        """The ready script's outcome (scheduler/lua/ready.lua): "ready" | "started" (it did something),
        "known" | "stale" (a confirmation: the control plane has this head, or a later one, already)."""
        spec = json.loads(text(spec_json))
        return text(await self._call("ready", [keys.group_prefix(spec["g"])], [self.lease_ms, text(spec_json)]))

    # ---- the API's transitions -----------------------------------------------------------------
    async def submit(self, req: NewRequest, *, owner: str = "",
                     on_sending: Callable[[], None] | None = None) -> tuple[str, int]:
        """Returns ("ok", seq of the `queued` event) or ("forbidden", 0). `on_sending` (_submit_call) is called
        just before the submit's call is written."""
        sid, rid = req.session_id, req.request_id
        args = [rid, sid, req.tenant, req.group, req.priority, req.max_tokens, req.input_text, req.input_kind,
                req.params_json, req.input_tokens, owner, self.log_max_events,
                req.deadline_ms or "", "fail" if req.fail_on_deadline_miss else "run",
                "" if req.boost_cap is None else req.boost_cap]
        dp = keys.session_prefix(sid)
        if self.single:
            reply = await self._submit_call(rid, "submit_one", [dp, keys.group_prefix(req.group)],
                                            [self.lease_ms, *args], on_sending)
        else:
            try:
                reply = await self._submit_call(rid, "submit", [dp], args, on_sending)
            except MaybeStored:
                if req.deadline_ms and req.fail_on_deadline_miss:
                    # Stored or not, behind its head or not: noted all the same. The sweep's expire keeps a
                    # request that is not there or is the head by then; the score, on this host's clock with a
                    # margin, must not come before the deadline the store noted on its own clock.
                    due = math.ceil(time.time() * 1000) + req.deadline_ms + LOST_NOTE_MARGIN_MS
                    await self._note_behind(req.group, rid, sid, str(due))
                raise
            if text(reply[0]) == "ok" and text(reply[2]):
                try:
                    await self._ready(reply[2])
                except Exception as error:
                    # Accepted means durable: the request is stored and its head is in the outbox,
                    # from where the repair pass readies it. A control master unreachable or refusing
                    # (OOM, MISCONF, ...) is no failure of the submit: a 503 would make the client's
                    # retry store a second request.
                    if not store_unavailable(error):
                        raise
                    log.warning("request %s stored; readying it failed (%s): the repair pass will", rid, error)
            elif text(reply[0]) == "ok" and text(reply[3]):
                await self._note_behind(req.group, rid, sid, text(reply[3]))
        outcome = text(reply[0])
        return outcome, int(reply[1]) if outcome == "ok" else 0

    async def _note_behind(self, group: str, rid: str, sid: str, deadline: str) -> None:
        """A request with a `fail` deadline that waits behind its session's head, noted in its group's dlq, its loop
        woken for it (cluster, note_behind.lua; submit_one does it on one server): only a head is readied, so else no
        sweep would see its deadline pass. Not noted (the control master unreachable or refusing: the submit still
        stands), it fails only once it is the head, as it did before dlq."""
        try:
            await self._call("note_behind", [keys.group_prefix(group)], [f"{rid}|{sid}", deadline])
        except Exception as error:
            if not store_unavailable(error):
                raise
            log.warning("request %s stored; noting its deadline failed (%s): it fails once it is its session's head",
                        rid, error)

    async def _submit_call(self, rid: str, name: str, keys_: Sequence[Any], args: Sequence[Any],
                           on_sending: Callable[[], None] | None = None) -> Any:
        """The submit's call. One whose answer was lost (the connection broke or timed out: it may have run)
        is sent once more with the same request id, which the script answers as the first time did
        (requests.lua): a stored request is never taken for a failed submit. Raises MaybeStored when that
        one gets no answer either. A first call that never went out (no connection could be made) or
        that was refused did nothing: its error is raised as it is (the plain 503 a client retries).
        `on_sending`: called once the connection is in hand, with no wait left before the call is written
        (the API's response deadline then answers that it may be stored: api/deadline.py)."""
        if on_sending is not None:
            await self.scripts.ready()
            on_sending()
        try:
            return await self._call(name, keys_, args)
        except Exception as error:
            if not store_unavailable(error) or store_refuses(error) or never_sent(error):
                raise
            log.warning("submit of %s got no answer (%s); asking again", rid, error)
        try:
            return await self._call(name, keys_, args)
        except Exception as error:
            if not store_unavailable(error):
                raise
            raise MaybeStored(rid) from error

    async def cancel(self, rid: str, *, owner: str = "") -> list[str]:
        """["cancelled"] | ["terminal", status] | ["missing"] | ["forbidden"]."""
        dp = keys.request_prefix(rid)
        if self.single:
            reply = await self._call("cancel_one", [dp], [self.lease_ms, self.ttl, rid, owner])
            return [text(x) for x in reply]
        reply = await self._call("cancel", [dp], [self.ttl, rid, owner])
        if text(reply[0]) != "cancelled":
            return [text(x) for x in reply]
        group, attempt, sid, produced, nxt = (text(x) for x in reply[1:6])
        try:  # cancelled already: what follows is repaired if it fails (stale entries, the outbox)
            await self._call("withdraw", [keys.group_prefix(group)], [self.lease_ms, rid, attempt, sid, produced])
            if nxt:
                await self._ready(nxt)
        except Exception as error:  # unreachable or refusing: the cancel is done, as for a submit
            if not store_unavailable(error):
                raise
            log.warning("request %s cancelled; withdrawing it failed (%s): the repair pass and sweep will", rid, error)
        return ["cancelled"]

    async def read_log(self, sid: str, after: int, limit: int) -> list[Any]:
        """[last id assigned, id of the oldest kept event, id holes, owner, entries after `after`...]
        (LOG_HEADER fields before the entries: sessions/lua/read_log.lua)."""
        return list(await self._call("read_log", [keys.session_prefix(sid)], [sid, after, limit]))

    # ---- a worker's transitions ----------------------------------------------------------------
    async def start(self, rid: str, attempt: str, wid: str, *, resume: str = "",
                    stopped_for: str = "") -> dict[str, Any] | None:
        """Start an assigned run on the data plane (cluster); None when it is no longer to run. `resume`:
        how the worker's engine resumes (its `resumed` event says it). `stopped_for`: the assignment's
        reason the previous attempt was preempted, for its `preempted` event if it is still running."""
        reply = await self._call("start", [keys.request_prefix(rid)], [rid, attempt, wid, resume, stopped_for])
        return json.loads(text(reply[1])) if int(reply[0]) == 1 else None

    async def append(self, rid: str, attempt: str, first_index: int, data: Sequence[str],
                     engine_times: tuple[float, float, float] | None = None) -> list[Any]:
        """`engine_times`: with the request's first batch, the worker's clock (ms) when it took the run from
        its inbox, called the engine and got the engine's first token; the request keeps them with its
        first token."""
        return list(await self._call("append", [keys.request_prefix(rid)],
                                     [rid, attempt, first_index, engine_times_arg(engine_times), *data]))

    async def finish(self, rid: str, attempt: str, *, wid: str, group: str, outcome: str, detail: str,
                     return_slot: bool, usage: dict[str, Any] | None = None, tail: Tail | None = None,
                     progress: EndProgress | None = None) -> bool:
        """End a run as done (`detail`: the finish_reason; `usage`: the backend's, for the whole request)
        or failed (`detail`: why). `tail`: the run's last tokens, appended in the same call before it ends
        (one call and one event batch instead of an append, then the end). `progress`: the caller's, when
        it retries this end (EndProgress)."""
        dp, cp, slot = keys.request_prefix(rid), keys.group_prefix(group), "1" if return_slot else "0"
        used = json.dumps(usage, separators=(",", ":")) if usage else ""
        last = [tail.first_index, engine_times_arg(tail.engine_times), *tail.data] if tail and tail.data else []
        if self.single:
            reply = await self._call("finish_one", [dp, cp], [self.lease_ms, self.ttl, rid, attempt, wid, outcome,
                                                               detail, slot, used, *last])
            return int(reply[0]) == 1
        key = f"{rid}|{attempt}"
        # Released before the next head is readied: a decision in between must not take the ended run
        # for a running one. Dying in between leaves the next head in the outbox (repair readies it).
        reply = await self._ended(
            progress or EndProgress(),
            lambda: self._call("finish", [dp], [self.ttl, rid, attempt, wid, outcome, detail, used, *last]),
            lambda reply: self._call("release", [cp], [self.lease_ms, key, wid, reply[2], text(reply[4]), slot,
                                                       reply[5]]),
            3)
        return int(reply[0]) == 1

    async def _ended(self, progress: EndProgress, data_step: Callable[[], Awaitable[Any]],
                     release: Callable[[Any], Awaitable[Any]], next_head: int) -> Any:
        """A run's end on a cluster: the data step, the release, then the session's next head readied (its
        spec at `next_head` of the data step's reply), each taken up where `progress` says it stopped."""
        if progress.reply is None:
            progress.reply = await data_step()
        reply = progress.reply
        if not progress.released:
            await release(reply)
            progress.released = True
        if text(reply[next_head]):
            await self._ready(reply[next_head])
        return reply

    async def hand_back(self, rid: str, attempt: str, *, wid: str, group: str, reason: str,
                        return_slot: bool, never_ran: bool = False, progress: EndProgress | None = None) -> bool:
        """`never_ran`: the worker's start of this attempt was refused (the request ended, or another attempt
        runs), so it generated nothing. On a cluster its release then reconciles it as no output, and a first
        attempt as no input (the only one charged for input): a repair pass that readied a head from a stale
        view of the outbox dispatches an attempt of a request that already ran (the same "rid|attempt"), whose
        tokens the data plane would count again. `progress`: the caller's, when it retries (EndProgress)."""
        dp, cp, slot = keys.request_prefix(rid), keys.group_prefix(group), "1" if return_slot else "0"
        if self.single:
            reply = await self._call("handback_one", [dp, cp], [self.lease_ms, rid, attempt, wid, reason, slot,
                                                                 self.max_attempts, self.ttl])
            return int(reply[0]) == 1
        key = f"{rid}|{attempt}"
        produced = 0 if never_ran else None
        counted_input = [0] if never_ran and attempt == "1" else []  # absent: the charge stands
        reply = await self._ended(
            progress or EndProgress(),
            lambda: self._call("handback", [dp], [rid, attempt, wid, reason, self.max_attempts, self.ttl]),
            lambda reply: self._call("release", [cp], [self.lease_ms, key, wid,
                                                       reply[2] if produced is None else produced,
                                                       text(reply[3]), slot, *counted_input]),
            4)
        return int(reply[0]) == 1

    async def _stopped(self, cp: str, key: str, wid: str, reply: Sequence[Any], slot: str) -> None:
        """After a data-plane hand-back: release the run (requeueing its request) and, when that was its
        last allowed attempt and it ended, ready the session's next head (else the outbox has it)."""
        await self._call("release", [cp], [self.lease_ms, key, wid, reply[2], text(reply[3]), slot])
        if text(reply[4]):
            await self._ready(reply[4])

    async def pin(self, group: str, rid: str, attempt: str) -> bool:
        """Make a running run immune to preemption (it is about to stream what no resume could continue);
        False when the control plane already stopped it."""
        return int(await self._call("pin", [keys.group_prefix(group)], [f"{rid}|{attempt}"])) == 1

    async def register_worker(self, group: str, wid: str, *, free: int, total: int,
                              shown: Mapping[str, Any] | None = None, held: Sequence[str] = ()) -> Offer:
        """`shown`: what operators see of the worker (its engine, what it can do), kept with its slots and
        the inbox format it reads. `held`: the runs the worker holds ("rid|attempt"); one whose slot no
        longer holds a ticket (handed over by fair-share preemption) does not count against `free`."""
        info = json.dumps({**(shown or {}), "slots": total, "inbox": INBOX_FORMAT}, separators=(",", ":"))
        started, excess = await self._call("register_worker", [keys.group_prefix(group)],
                                           [self.lease_ms, wid, free, total, info, *held])
        return Offer(int(started), int(excess))

    async def heartbeat(self, group: str, wid: str, held: Sequence[str], *, leaving: bool = False,
                        lease_ms: int | None = None) -> tuple[bool, list[str]]:
        """One call per HEARTBEAT_CHUNK runs, one after the other: a worker with hundreds of runs would
        otherwise hold the server for milliseconds in one script, and every other caller's p99 with it."""
        lease, rejoin, lost = lease_ms or self.lease_ms, False, []
        for start in range(0, max(len(held), 1), HEARTBEAT_CHUNK):
            mode = "live" if start == 0 and not leaving else "leaving"
            reply = await self._call("heartbeat", [keys.group_prefix(group)],
                                     [lease, wid, mode, *held[start:start + HEARTBEAT_CHUNK]])
            rejoin = rejoin or int(reply[0]) == 1
            lost += [text(x) for x in reply[1:]]
        return rejoin, lost

    # ---- the scheduler's transitions -----------------------------------------------------------
    async def sweep(self, group: str) -> SweepResult:
        """One group's sweep; on a cluster also hands back and releases the runs of lost workers."""
        cp = keys.group_prefix(group)
        reply = await self._call("sweep", [cp], [self.lease_ms, self.max_attempts, self.ttl])
        lost = int(reply[5])
        # Each run and each expiry alone: a data master unreachable or refusing must not hold back those
        # of the sessions on the other masters (the lost runs come oldest lease first, so the same one
        # would fail first again at every sweep).
        for entry in (text(x) for x in reply[6:6 + lost]):
            reason, _, key = entry.partition(":")  # worker_lost (counts as a failed attempt) | lease_lapsed
            rid, _, attempt = key.rpartition("|")
            try:
                stopped = await self._call("handback", [keys.request_prefix(rid)],
                                           [rid, attempt, "", reason, self.max_attempts, self.ttl])
                await self._stopped(cp, key, "", stopped, "keep")
            except Exception as error:
                if not store_unavailable(error):
                    raise
                log.warning("sweep: handing back %s failed (%s); the next sweep retries it", key, error)
                # its lease pushed back a little: else the oldest leases, all of one master that refuses,
                # would fill every sweep's batch, and the lost runs behind them would never be reached
                await settled(self.scripts.client.zadd(keys.group_key(group, "leases"),
                                                       {key: float(reply[4]) + LEASE_PUSH_BACK_MS}, xx=True,
                                                       gt=True))  # a lease renewed meanwhile stands
        checks = []  # "check:rid|sid": a dlq entry to take out if its request is gone or ended
        for entry in (text(x) for x in reply[6 + lost:]):  # deadlines missed by requests that fail then
            if entry.startswith("check:"):
                checks.append(entry.removeprefix("check:"))
                continue
            # "behind:rid|sid": one submitted behind its session's head (dlq), ended only if still there
            behind = entry.startswith("behind:")
            rid, _, sid = entry.removeprefix("behind:").partition("|")
            try:
                await self._expire(rid, reply[4], behind=behind)
            except Exception as error:
                if not store_unavailable(error):
                    raise
                log.warning("sweep: ending %s past its deadline failed (%s); the next sweep retries it", rid, error)
                zset, member = ("dlq", f"{rid}|{sid}") if behind else ("dld", sid)
                await settled(self.scripts.client.zadd(keys.group_key(group, zset), {member: float(reply[4])}))
        if checks:
            await self._drop_ended_behind(group, checks)
        return SweepResult(int(reply[0]), int(reply[1]), int(reply[2]), float(reply[3]), float(reply[4]))

    async def _drop_ended_behind(self, group: str, entries: Sequence[str]) -> None:
        """Take out of the group's dlq the "rid|sid" entries whose request is gone or ended (cluster: the sweep
        returns a batch in turn, sweep.lua). Such an entry was left by a cancel whose control step failed, or
        noted after a submit whose answers were lost for a request never stored (maybe_stored): else it stayed
        up to its deadline, a day at most, past its session. A request stored after this read (that lost
        submit's call still on its way) loses its note, as when the note itself fails: it fails once it is its
        session's head. A status that cannot be read keeps its entry for the next turn."""
        pipe = self.scripts.client.pipeline(transaction=False)
        for entry in entries:
            pipe.hget(keys.request(entry.partition("|")[0]), "st")
        try:
            statuses = await settled(pipe.execute(raise_on_error=False))
            ended = [entry for entry, status in zip(entries, statuses, strict=True)
                     if not isinstance(status, BaseException)
                     and (status is None or text(status) in keys.TERMINAL_STATUSES)]
            if ended:
                await settled(self.scripts.client.zrem(keys.group_key(group, "dlq"), *ended))
        except Exception as error:
            if not store_unavailable(error):
                raise
            log.warning("sweep: checking %d dlq entries failed (%s); their next turn will", len(entries), error)

    async def _expire(self, rid: str, now: Any, *, behind: bool = False) -> None:
        """End a request past its `fail` deadline on its data plane, at the sweep's clock, then withdraw it.
        `behind`: found in dlq, so ended only while it still waits behind its session's head."""
        ended = await self._call("expire", [keys.request_prefix(rid)], [self.ttl, rid, now, "behind" if behind else ""])
        if text(ended[0]) == "expired":
            group, attempt, sid, nxt = (text(x) for x in ended[1:5])
            await self._call("withdraw", [keys.group_prefix(group)], [self.lease_ms, rid, attempt, sid, -1])
            if nxt:
                await self._ready(nxt)

    async def repair(self, buckets: Sequence[str], *, age_ms: int, limit: int = 100) -> int:
        """Ready again the heads that a dead caller left in the buckets' outboxes (cluster only). Returns how
        many the control plane did not have (made ready or started): a head whose ready succeeded but waits
        longer than `age_ms` for a slot is only confirmed, and is no half-done transition.

        One pipelined ZCOUNT per bucket finds the outboxes with old entries (by this host's clock, a
        second early: the `outbox` function decides by the server's); only those are called on. A pass
        over 1024 empty outboxes measured 0.21 s of CPU as function calls, which redis-py's cluster
        client routes only after asking a server for their keys. One pipeline per master: a master
        unreachable, busy, loading or refusing leaves its own buckets for the next pass, not the others'."""
        cutoff = time.time() * 1000 - max(0, age_ms - 1000)
        counts: dict[str, Any] = {}
        for group in await self._by_master(buckets):
            pipe = self.scripts.client.pipeline(transaction=False)
            for bucket in group:
                pipe.zcount(keys.outbox(bucket), "-inf", cutoff)
            try:
                replies = await settled(pipe.execute(raise_on_error=False))
            except Exception as error:
                if not store_unavailable(error):
                    raise
                replies = [error] * len(group)
            counts.update(zip(group, replies, strict=True))
        failed = [b for b in buckets if isinstance(counts[b], BaseException)]
        if failed:
            log.warning("repair: %d buckets' outboxes could not be read (%s); the next pass retries them",
                        len(failed), counts[failed[0]])
        repaired = 0
        refused: set[str] = set()  # the groups whose control master refused a ready in this pass
        for bucket in (b for b in buckets if counts[b] and not isinstance(counts[b], BaseException)):
            try:
                repaired += await self._repair_bucket(bucket, age_ms, limit, refused)
            except Exception as error:
                # A master unreachable or refusing (OOM, MISCONF, ...) must not stall the buckets after
                # this one: every pass starts again at the first bucket. This one waits for the next pass.
                if not store_unavailable(error):
                    raise
                log.warning("repair of bucket %s failed (%s); the next pass retries it", bucket, error)
        return repaired

    async def _by_master(self, buckets: Sequence[str]) -> list[list[str]]:
        """The buckets grouped by the master that holds their outbox (the client's slot map); one group on
        one server."""
        client = self.scripts.client
        if not hasattr(client, "get_node_from_key"):
            return [list(buckets)]
        initialize = getattr(client, "initialize", None)
        if initialize is not None and asyncio.iscoroutinefunction(initialize):
            await initialize()  # the asyncio client's slot map (dropped after a connection error)
        groups: dict[str, list[str]] = {}
        for bucket in buckets:
            groups.setdefault(client.get_node_from_key(keys.outbox(bucket)).name, []).append(bucket)
        return list(groups.values())

    async def _repair_bucket(self, bucket: str, age_ms: int, limit: int, refused: set[str]) -> int:
        """Ready the bucket's old outbox heads. Every head the control plane answered for leaves the outbox;
        only those it did not have count as completed. One whose group's master refuses or cannot be reached
        goes to the back of the outbox (the others in the bucket, of other groups, are still readied, and
        the next pass's batch reaches those behind it), and so do the rest of that group's in this pass,
        without a call: `refused` (shared by the pass's buckets) names the groups whose master refused."""
        dp = keys.data_prefix(bucket)
        specs = await self._call("outbox", [dp], [age_ms, limit])
        done: list[str] = []
        later: list[str] = []
        completed = 0
        for spec_json in specs:
            spec = json.loads(text(spec_json))
            rid, group = spec["rid"], spec["g"]
            if group in refused:
                later.append(rid)
                continue
            try:
                outcome = await self._ready(spec_json)
            except Exception as error:
                if not store_unavailable(error):
                    raise
                log.warning("repair: readying %s failed (%s); group %s's heads wait for the next pass",
                            rid, error, group)
                refused.add(group)
                later.append(rid)
                continue
            done.append(rid)
            if outcome in ("ready", "started"):
                completed += 1
            else:  # known/stale: the caller's own ready had landed (the head waits or runs), a confirmation
                log.debug("repair: %s confirmed (%s)", rid, outcome)
        if done or later:
            await self._call("outbox_done", [dp], [len(done), *done, *later])
        return completed
