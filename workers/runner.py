"""One run of one request on one worker slot: stream the engine's tokens into the session log.

Token writes are coalesced: at most one append is in flight per run, and whatever the engine
produced meanwhile goes out in the next append. The first token leaves at once, and a fast engine
costs one Redis round trip per batch rather than per token. What is left when the engine has ended
(its last tokens came with its finish, or while an append was in flight) goes with the run's end:
one call, and one batch for the readers, instead of an append and then the end. With an interval
(--stream-interval-ms), an append starts about once per interval after the first, which is never held:
a fast engine's run then costs its first append, a few batches and its end. The engine's end or failure
cuts a hold short, and so does a full batch (MAX_BATCH) waiting, so no token waits much past an interval.
Every append is fenced by attempt: the moment the run is preempted, cancelled or its lease lost, the
next append says so and the run stops. A dropped Redis connection is retried (the fence makes a
resent batch safe) rather than failing a generation that is otherwise fine.

A request with a `"on_deadline_miss": "fail"` deadline and no first token yet has a timer (its run spec
says how long is left; no other run pays for one): if it fires before the first append has begun, the
engine call and the writer are stopped and the run ends failed (`deadline_exceeded`), nothing it generated
written; if the first append is on its way, the store decides, by its clock, as it does for every first
token: written in time, the deadline was met and the run goes on; past it, refused, and the run ends failed,
also when the engine failed meanwhile (the store's refusal of an append wins over the engine's failure).
A run whose deadline passed before it started ends so at once, without calling the engine.

A token is its text, and, when the engine gave a `Token`, the backend's raw non-text delta (tool
calls) and logprobs, carried in its `token` event. A run is pinned (never preempted) before its first
non-text delta is written, and a run with structured output (STRUCTURED_PARAMS) before its first token:
no engine continues either; such a structured run whose backend fails ends failed (README "Tool calls and
resumes"). The engine's `Finish` (finish_reason, usage) becomes the run's outcome, which the worker writes
into the `done` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson

from sluicegate.sessions.runs import DEADLINE_EXCEEDED, AppendResult, RunSpec, RunStore, delta_kind
from sluicegate.sessions.transitions import Tail
from sluicegate.workers.engines.base import BackendDown, Engine, EngineError, Finish, Token
from sluicegate.workers.redis_retry import through_dropped_connections

log = logging.getLogger(__name__)

# A run's params that constrain its output to a format (a JSON object or schema, a regex, a grammar, a choice):
# an engine constrains only what it generates, so a resume that continues the output so far makes output
# that does not match (two JSON objects run together); such a run is pinned at its first token, as a tool call
# is, and never resumed. `response_format` is OpenAI's (json_object, json_schema); the rest are vLLM's,
# SGLang's, llama.cpp's and TGI's own.
STRUCTURED_PARAMS = ("guided_json", "guided_regex", "guided_grammar", "guided_choice", "json_schema", "grammar",
                     "regex", "ebnf", "structured_outputs")
STRUCTURED = "structured output"  # in the tenant-facing message of such a run, interrupted
MAX_BATCH = 256
APPEND_RETRY_SECONDS = 30.0  # past this the lease is long gone: hand the run back instead
# A run's end waits this long at most for its writer and engine call to stop after their cancel: a cancel
# can be lost (redis-py's cluster client returned an append normally that was cancelled mid-way), and a run
# that never ended would hold its slot and its lease for good.
STOP_WAIT_SECONDS = 5.0


class Fenced(Exception):
    """The run no longer owns its request."""


class PinRefused(Fenced):
    """The control plane stopped the run before its pin (on a cluster its data plane learns why from the
    run's hand-back only: the worker's notice says)."""


class DeadlineMissed(Exception):
    """The store refused the first token: it came past the request's `fail` deadline."""


@dataclass
class RunOutcome:
    kind: str  # "done" | "fenced" | "engine_error" | "deadline_exceeded" (detail DEADLINE_EXCEEDED)
    detail: str = ""  # done: the finish_reason; otherwise what went wrong
    transient: bool = False
    usage: dict[str, Any] | None = None  # done: the backend's usage for the whole request, if it reported one
    tail: Tail | None = None  # done: the tokens not appended yet, which the run's end appends
    pin_refused: bool = False  # fenced: by its pin's refusal (PinRefused)
    backend_down: bool = False  # engine_error: the backend was not reached before the first token (BackendDown)


def structured(params: dict[str, Any]) -> bool:
    """Whether a run's params constrain its output to a format (STRUCTURED_PARAMS)."""
    response_format = params.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        return True
    return any(params.get(name) not in (None, "", [], {}) for name in STRUCTURED_PARAMS)


def cannot_continue(streamed: str, *, shutdown_grace: float | None = None) -> str:
    """The failure of a pinned run that was interrupted; `streamed` names what (sessions/runs.py
    `delta_kind`, or STRUCTURED), since tenants read it: a reasoning model never streamed a tool call.
    Also the worker's, for a pinned run it finds interrupted in the log, and (`shutdown_grace`) for one
    it ends itself when its shutdown's grace ran out (Run.unresumable), rather than hand it back to fail."""
    if shutdown_grace is None:
        cause = "the run was interrupted after it streamed"
    else:
        cause = (f"the worker shut down (its --shutdown-grace-seconds of {shutdown_grace:g} s ran out) while the "
                 "run streamed")
    return f"{cause} {streamed}, which no engine can continue: call again"


def token_data(rid: str, index: int, token: str | Token) -> str:
    if isinstance(token, str):
        return f'{{"request_id":"{rid}","index":{index},"text":{orjson.dumps(token).decode()}}}'
    data: dict[str, Any] = {"request_id": rid, "index": index, "text": token.text}
    if token.delta:
        data["delta"] = token.delta
    if token.logprobs is not None:
        data["logprobs"] = token.logprobs
    return orjson.dumps(data).decode()


class Run:
    def __init__(self, store: RunStore, engine: Engine, spec: RunSpec, *, taken_at: float | None = None,
                 interval: float = 0.0) -> None:
        self.store = store
        self.interval = interval  # seconds between the starts of two appends (--stream-interval-ms)
        self.engine = engine
        self.spec = spec
        self.next_index = spec.start_index
        self._pending: list[str | Token] = []
        self._wake = asyncio.Event()
        self._produced_all = False
        self._ended_cleanly = False  # the engine's stream ended: what is pending goes with the run's end
        self._hold_over = asyncio.Event()  # the engine ended, or a full batch waits: a hold ends at once
        self.finish: Finish | None = None
        self._pinned = False
        self._structured = structured(spec.params)  # pinned at its first token, never resumed
        self._delta_fields: set[str] = set()  # of the non-text deltas sent to the store
        # What this run sent the store that no engine can continue (a `delta_kind`, or STRUCTURED), as the
        # next worker would find it in the log; None while a resume can still take the run over. Set when a
        # batch leaves, not when it lands: a cancelled append can still land.
        self.unresumable: str | None = None
        # The worker's clock (ms) when it took the run from its inbox, called the engine and got the
        # engine's first token: the request's first append carries them, so the request shows where its
        # first token's time went (taken_at: Assignment.taken_at; unknown, it is the call's time).
        self._taken_at = taken_at
        self._engine_called: float | None = None
        self._engine_answered: float | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None  # armed until the first token is written
        self._appending = False  # an append is on its way to the store
        self._missed = False  # the timer stopped the run
        self._stopping = False  # the run is ending: the writer leaves at its next step, cancelled or not

    @property
    def key(self) -> str:
        return f"{self.spec.request_id}|{self.spec.attempt}"

    async def _write_loop(self) -> None:
        rid = self.spec.request_id
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending and not self._stopping:
                if self._ended_cleanly and len(self._pending) <= MAX_BATCH:
                    return  # the run's end carries them (execute)
                batch = self._pending[:MAX_BATCH]
                data = [token_data(rid, self.next_index + i, token) for i, token in enumerate(batch)]
                if self._pinned:  # unpinned, it sends neither a delta nor structured output
                    self._note_unresumable(batch)
                began = asyncio.get_running_loop().time()
                self._appending = True
                try:
                    result = await self._append(data, self._engine_times())
                finally:
                    self._appending = False
                if self._stopping:  # (its cancel may have been lost on the way: see STOP_WAIT_SECONDS)
                    return
                if not result.ok:
                    if result.deadline_missed:
                        raise DeadlineMissed
                    raise Fenced(result.status if result.expected_index is None
                                 else f"index {self.next_index} but the log expects {result.expected_index}")
                self._disarm_deadline()  # the first token is written: the deadline was met
                del self._pending[:len(batch)]
                self.next_index += len(batch)
                if self.interval and not self._produced_all:
                    await self._hold(began + self.interval)
            if self._produced_all or self._stopping:
                return

    def _note_unresumable(self, batch: list[str | Token]) -> None:
        """A pinned run's batch leaves: what it makes the run that no engine can continue (unresumable), in
        the worker's words for such a run found in the log (a delta's kind first, then STRUCTURED)."""
        self._delta_fields.update(name for token in batch if isinstance(token, Token) and token.delta
                                  for name in token.delta)
        if self._delta_fields:
            self.unresumable = delta_kind(self._delta_fields)
        elif self._structured:
            self.unresumable = STRUCTURED

    async def _hold(self, until: float) -> None:
        """The tokens that come meanwhile wait for the next append until `until` (the loop's clock), until
        a full batch waits (so the delay never grows past the interval), or until the engine's stream
        ends, whichever is first: an ended engine's tokens then go with the run's end at once."""
        if len(self._pending) >= MAX_BATCH or until <= asyncio.get_running_loop().time():
            return
        self._hold_over.clear()  # the caller saw the engine still running: nothing awaited since
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(until):
                await self._hold_over.wait()

    async def _append(self, data: list[str], engine_times: tuple[float, float] | None) -> AppendResult:
        """One fenced append, resent through dropped connections (a resent batch is recognised)."""
        spec = self.spec
        return await through_dropped_connections(
            lambda: self.store.append(spec.request_id, spec.attempt, self.next_index, data, engine_times),
            seconds=APPEND_RETRY_SECONDS, what=f"run {self.key}: append")

    async def _pin(self) -> bool:
        """Pin the run (scheduler/lua/pin.lua), resent through dropped connections and a store refusing work
        for a while, as appends are: bare, a brief refusal at the first token ended a sound run (handed back,
        regenerated). A resend is safe: pinning a running run twice pins it once, and a stopped one is refused."""
        spec = self.spec
        return await through_dropped_connections(lambda: self.store.pin(spec.request_id, spec.attempt),
                                                 seconds=APPEND_RETRY_SECONDS, what=f"run {self.key}: pin")

    def _engine_times(self) -> tuple[float, float, float] | None:
        """The engine's call and first token, with the request's first batch only (a resumed attempt's
        would be ignored: the request keeps the times of its first token)."""
        if self.next_index != 0 or self._engine_called is None or self._engine_answered is None:
            return None
        return self._taken_at or self._engine_called, self._engine_called, self._engine_answered

    async def _produce(self, so_far: str) -> None:
        self._engine_called = time.time() * 1000
        async for piece in self.engine.stream(self.spec, so_far):
            if isinstance(piece, Finish):
                self.finish = piece
                continue
            if self._engine_answered is None:
                self._engine_answered = time.time() * 1000
            delta = piece.delta if isinstance(piece, Token) else None
            if (delta or self._structured) and not self._pinned:
                # A resume continues text, not a half-made tool call or reasoning, nor a constrained output
                # (STRUCTURED_PARAMS): pinned first (never preempted from here on), or not written at all
                # when the run was stopped meanwhile.
                if not await self._pin():
                    raise PinRefused(f"stopped before it streamed {delta_kind(delta) if delta else STRUCTURED}")
                self._pinned = True
            self._pending.append(piece)
            self._wake.set()
            if len(self._pending) >= MAX_BATCH:
                self._hold_over.set()
        self._produced_all = self._ended_cleanly = True
        self._wake.set()
        self._hold_over.set()

    def _tail(self) -> Tail | None:
        """The tokens the writer left for the run's end (it leaves them once the engine has ended)."""
        if not self._pending:
            return None
        rid = self.spec.request_id
        data = [token_data(rid, self.next_index + i, token) for i, token in enumerate(self._pending)]
        return Tail(self.next_index, data, self._engine_times())

    def _deadline_passed(self, producer: asyncio.Task[None], writer: asyncio.Task[None]) -> None:
        """The `fail` deadline's timer: no first token is written yet. With the first append on its way the
        store decides (see the module's docstring); else the run stops here, the engine call with it."""
        self._deadline_timer = None
        if self._appending:
            return
        self._missed = True
        producer.cancel()
        writer.cancel()

    def _disarm_deadline(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None

    async def execute(self, so_far: str = "") -> RunOutcome:
        """Generate until done; returns how it ended. Cancellation (control message, shutdown) propagates."""
        left = self.spec.deadline_left_ms
        if left is not None and left <= 0:  # its `fail` deadline passed before it started
            return RunOutcome("deadline_exceeded", DEADLINE_EXCEEDED)
        if self._structured and self.spec.start_index:  # pinned, but its worker was lost: never continued
            return RunOutcome("engine_error", cannot_continue(STRUCTURED))
        # The producer first: its first step (up to the engine call) runs before the writer's, which
        # only waits for tokens.
        producer = asyncio.create_task(self._produce(so_far))
        writer = asyncio.create_task(self._write_loop())
        if left is not None:  # a ms late rather than early: a loop's timer may fire up to a ms early
            self._deadline_timer = asyncio.get_running_loop().call_later((left + 1) / 1000, self._deadline_passed,
                                                                         producer, writer)
        try:
            done, _ = await asyncio.wait({writer, producer}, return_when=asyncio.FIRST_EXCEPTION)
            if self._missed:
                return RunOutcome("deadline_exceeded", DEADLINE_EXCEEDED)
            for task in (writer, producer):  # the store's refusal first, whatever order `done` has
                if task in done and (error := task.exception()) is not None:
                    raise error
            if self.finish is None:  # the engine produced max_tokens tokens and said nothing more
                return RunOutcome("done", "length", tail=self._tail())
            return RunOutcome("done", self.finish.reason, usage=self.finish.usage, tail=self._tail())
        except Fenced as fenced:
            return RunOutcome("fenced", str(fenced), pin_refused=isinstance(fenced, PinRefused))
        except DeadlineMissed:
            return RunOutcome("deadline_exceeded", DEADLINE_EXCEEDED)
        except EngineError as error:
            self._disarm_deadline()  # it could fire during the flush and cancel the writer: a cancel, not this error
            await self._flush_quietly(writer)
            refused = self._refused(writer)
            if refused is not None:
                return refused
            if error.transient and self._pinned and self._structured:  # a resume could only spoil its output
                log.info("run %s: %s; its structured output cannot be resumed", self.key, error)
                return RunOutcome("engine_error", f"{cannot_continue(STRUCTURED)} ({error})")
            return RunOutcome("engine_error", str(error), transient=error.transient,
                              backend_down=isinstance(error, BackendDown))
        finally:
            self._disarm_deadline()
            self._stopping = True
            self._wake.set()
            self._hold_over.set()
            for task in (writer, producer):
                task.cancel()
            done, pending = await asyncio.wait({writer, producer}, timeout=STOP_WAIT_SECONDS)
            for task in done:
                if not task.cancelled():
                    task.exception()  # retrieved: what it raised was handled above, or does not matter now
            if pending:
                log.warning("run %s: %d of its tasks did not stop within %g s of its end; left behind", self.key,
                            len(pending), STOP_WAIT_SECONDS)

    @staticmethod
    def _refused(writer: asyncio.Task[None]) -> RunOutcome | None:
        """How the run ended when the store refused the writer's append while the engine failed (the flush
        waits for that append): past the `fail` deadline, or fenced. That decides the run: taken as the
        engine's error, it would be handed back, an attempt counted, and fail later for another reason."""
        if not writer.done() or writer.cancelled():
            return None
        error = writer.exception()
        if isinstance(error, DeadlineMissed):
            return RunOutcome("deadline_exceeded", DEADLINE_EXCEEDED)
        if isinstance(error, Fenced):
            return RunOutcome("fenced", str(error), pin_refused=isinstance(error, PinRefused))
        return None

    async def _flush_quietly(self, writer: asyncio.Task[None]) -> None:
        """After an engine error, keep the tokens it did produce (they count for the resume)."""
        self._produced_all = True
        self._wake.set()
        self._hold_over.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(writer), timeout=5)
