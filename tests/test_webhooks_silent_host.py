"""A receiver that gives no attempt a timely success bounds its backlog: once every attempt to it has been cut
at the timeout, or failed only after SLOW_AFTER_SECONDS, for the retry schedule's whole span, what of it
waits for its host's places is failed unsent; its own places keep trying. Silence is only what such attempts
saw: a success, or a quick failure, ends it (separate spells never add up), and a time no attempt saw (a
delivery outage) is none. The receiver is the callback URL's origin: a healthy one on another port of a dead
one's host loses nothing. Real Valkey; receivers on 127.0.0.1 (one host: they share its places; each port is
an origin, with its own silence), time scaled down: a 0.3-s timeout, so a whole schedule of 0.65 s (2
attempts) or 1.05 s (3)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from sluicegate.sessions import callbacks, keys
from sluicegate.settings import Settings
from sluicegate.webhooks import delivery as delivery_module
from sluicegate.webhooks.delivery import Delivery
from tests.helpers import ON_CLUSTER
from tests.test_webhooks import BlackHole, hook_settings
from tests.test_webhooks_recovery import ended_with_callback

HOST = "127.0.0.1"
GAVE_UP = "the receiver gave no success to any attempt for"
POLL = 0.1


class Receiver:
    """A loopback HTTP receiver of callbacks on a port of its own; `answer(handler)` answers one POST, its body
    read (subclasses)."""

    def __init__(self) -> None:
        self.release = threading.Event()  # ends the held handlers at teardown
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers["content-length"]))
                outer.answer(self)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{HOST}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        raise NotImplementedError

    @staticmethod
    def reply(handler: BaseHTTPRequestHandler, status: int) -> None:
        handler.send_response(status)
        handler.send_header("content-length", "0")
        handler.end_headers()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class HangingReceiver(Receiver):
    """Answers 200 in 10 ms, except to a request that comes within one of `hangs` ((start, end), time.time()):
    that one it holds without answering (its attempt is cut at the timeout)."""

    def __init__(self, hangs: Sequence[tuple[float, float]] = ()) -> None:
        self.taken: dict[str, float] = {}
        self.hangs = hangs
        super().__init__()

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        now = time.time()
        if any(start <= now < end for start, end in self.hangs):
            self.release.wait(60)
            return
        time.sleep(0.01)
        self.taken.setdefault(handler.path, now)
        self.reply(handler, 200)


def small_settings(redis_url: str, *, attempts: int = 2) -> Settings:
    """A 0.3-s timeout, a 0.05-s backoff: a whole retry schedule of 0.65 s (2 attempts) or 1.05 s (3)."""
    return hook_settings(redis_url, webhook_timeout=0.3, webhook_backoff=0.05, webhook_max_attempts=attempts,
                         session_ttl=600)


def schedule_span(settings: Settings) -> float:
    """The retry schedule's whole span: every backoff and every attempt's timeout."""
    attempts = settings.webhook_max_attempts
    return settings.webhook_backoff * (2 ** (attempts - 1) - 1) + attempts * settings.webhook_timeout


def watching(flow: Flow, seconds: float, look: Callable[[float], None], *,
             began: float | None = None) -> Callable[[], Coroutine[Any, Any, None]]:
    """A `produce` for run_delivery: the flow for `seconds`, and `look(seconds since the flow began)` every 50 ms
    meanwhile."""
    async def produce() -> None:
        start = time.time() if began is None else began

        async def watch() -> None:
            while True:
                look(time.time() - start)
                await asyncio.sleep(0.05)

        task = asyncio.create_task(watch())
        try:
            await flow.run(seconds, began=start)
        finally:
            task.cancel()

    return produce


def run_delivery(settings: Settings, *, seconds: float, produce: Callable[[], Coroutine[Any, Any, None]] | None = None,
                 until: Callable[[], bool] | None = None) -> None:
    """One delivery process (polling every POLL s) for `seconds`, beside `produce`, or until `until()`; then
    stopped (its attempts in flight end first: cut ones note their host's silence)."""

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(Delivery(settings, poll_seconds=POLL).run(stop))
        deadline = time.monotonic() + seconds
        producing = asyncio.create_task(produce()) if produce is not None else None
        while time.monotonic() < deadline and not (until and until()):
            await asyncio.sleep(0.05)
        if producing is not None:
            producing.cancel()
        stop.set()
        await asyncio.wait_for(task, 30)

    asyncio.run(main())


class Flow:
    """Callbacks to `url` ending at `per_second` (in bursts every 0.1 s), each due at its end, as the terminal
    step leaves them, in 31 buckets; it samples how many are still queued."""

    def __init__(self, r, url: str, *, per_second: int = 40, name: str = "sil") -> None:
        self.r, self.url, self.per_second, self.name = r, url, per_second, name
        self.ended: dict[str, float] = {}
        self.queued: list[tuple[float, int]] = []  # (seconds since the flow began, callbacks queued)

    def queued_now(self) -> int:
        return sum(self.r.zcard(keys.callbacks_due(keys.all_buckets()[i])) for i in range(31))

    async def run(self, seconds: float, *, began: float | None = None) -> None:
        began = time.time() if began is None else began
        i = 0
        while time.time() < began + seconds:
            for _ in range(max(1, self.per_second // 10)):
                rid = f"{keys.all_buckets()[i % 31]}{self.name}{i}"
                i += 1
                now = time.time()
                ended_with_callback(self.r, rid, f"{self.url}/{rid}", ended_ms=int(now * 1000), ttl_ms=600_000)
                self.ended[rid] = now
            self.queued.append((time.time() - began, self.queued_now()))
            await asyncio.sleep(0.1)

    def outcomes(self) -> dict[str, tuple[str | None, str | None]]:
        return {rid: (self.r.hget(keys.request(rid), "cbs"), self.r.hget(keys.request(rid), "cbe"))
                for rid in self.ended}

    def queued_at(self, second: float) -> int:
        return next(n for at, n in self.queued if at >= second)


@pytest.mark.parametrize("slow_after", [1.0, 0.1], ids=["held-and-left", "pushed-back"])
def test_a_silent_hosts_backlog_stops_growing_once_it_answered_nothing_for_a_whole_schedule(
        redis_url: str, r, monkeypatch: pytest.MonkeyPatch, slow_after: float) -> None:
    """40 callbacks a second for 5 s to a receiver that accepts and never answers: 4 attempts of 0.3 s at
    once (PER_HOST) take about 13 a second, and each callback has 2 attempts, so about 7 a second are failed
    by their schedule and the rest wait (held, left, or, once the host is slow, pushed back). Once the host
    has answered no attempt for the whole schedule (0.65 s of cuts), each callback that would wait is failed
    unsent, naming why; the host's own places keep trying; and the count of callbacks still queued stops
    growing: about 10-45 all along here. (Before: none was failed unsent, and the queue grew by about 35 a
    second: about 60 at 1.5 s, 100 at 2.6 s.) Run with the host never slow (attempts cut before
    SLOW_AFTER_SECONDS: held, then left) and slow (pushed back)."""
    monkeypatch.setattr(delivery_module, "SLOW_AFTER_SECONDS", slow_after)
    settings = small_settings(redis_url)
    span = schedule_span(settings)  # 0.65 s
    hole = BlackHole(HOST)
    flow = Flow(r, f"{hole.url}/void")
    accepted_at: list[tuple[float, int]] = []
    first_given_up: list[float] = []  # seconds after the flow began

    def look(at: float) -> None:
        accepted_at.append((at, hole.accepted))
        if not first_given_up:
            pipe = r.pipeline(transaction=False)
            for rid in list(flow.ended):
                pipe.hget(keys.request(rid), "cbe")
            if any((cbe or "").startswith(GAVE_UP) for cbe in pipe.execute()):
                first_given_up.append(at)

    try:
        run_delivery(settings, seconds=5.5, produce=watching(flow, 5.0, look))
    finally:
        hole.stop()
    outcomes = flow.outcomes()
    status = Counter(cbs for cbs, _ in outcomes.values())
    gave_up = {rid for rid, (cbs, cbe) in outcomes.items() if cbs == "failed" and (cbe or "").startswith(GAVE_UP)}
    assert len(gave_up) > 50, (status, flow.queued[::5])  # about 100 here; none before
    # none before a whole schedule of cuts: the first attempts are cut 0.3 s in, the first give-up is 0.65 s later
    assert first_given_up[0] >= settings.webhook_timeout + span - 0.05, first_given_up
    (last_at, queued_late), queued_early = flow.queued[-1], flow.queued_at(1.5)
    assert last_at >= 4.0, flow.queued
    assert queued_late <= queued_early + 15, flow.queued[::5]  # bounded: 8-16 from 1.5 s on here
    assert queued_late <= 40, flow.queued[::5]
    assert hole.most_open <= delivery_module.PER_HOST + 1  # the hole sees a cut connection close up to 50 ms late
    assert Delivery(settings).give_up_after() == pytest.approx(span)
    after = [n for at, n in accepted_at if at >= 4.0]
    assert after and after[-1] > after[0], accepted_at[-15:]  # its own places keep trying
    silence = r.hget(keys.CALLBACKS_SILENT, callbacks.callback_origin(hole.url))
    assert silence is not None  # still silent at the end


def test_a_healthy_receiver_loses_nothing_to_a_delivery_outage_longer_than_a_schedule(redis_url: str, r) -> None:
    """150 callbacks to a receiver that answers in 10 ms, left due by a delivery outage of 3 s (more than four
    times the 0.65-s schedule): no attempt was cut, so no silence was noted, and every one is delivered (more
    than its host's 4 places and 100 held: some wait, left due a moment)."""
    settings = small_settings(redis_url)
    receiver = HangingReceiver()
    rids = [f"{keys.all_buckets()[i % 7]}out{i}" for i in range(150)]
    ended_ms = int(time.time() * 1000) - 3_000
    for rid in rids:
        ended_with_callback(r, rid, f"{receiver.url}/{rid}", ended_ms=ended_ms, ttl_ms=600_000)
    try:
        run_delivery(settings, seconds=20.0, until=lambda: all(r.hget(keys.request(rid), "cbs") for rid in rids))
    finally:
        receiver.stop()
    outcome = Counter((r.hget(keys.request(rid), "cbs"), r.hget(keys.request(rid), "cbe")) for rid in rids)
    assert outcome == {("delivered", None): 150}, outcome
    assert not r.hgetall(keys.CALLBACKS_SILENT)


def test_a_silence_before_a_delivery_outage_does_not_count_past_it(redis_url: str, r) -> None:
    """A receiver hangs while callbacks come at 40 a second to it and a delivery process runs, until that process
    has failed one unsent (its attempts cut for more than the 0.65-s schedule, the silence noted); the process
    stops then, and the hang only after it (a first answer before its end would start a new silence). Then no
    delivery process runs for about 2 s (longer than the 1.1-s gap a silence allows between two cuts), the
    receiver answering again meanwhile; 150 callbacks are due to it when one starts again. The old silence is
    not counted on (no attempt saw the outage, and the first one answered ends it): all 150 are delivered, none
    failed unsent (they would be if a silence noted before an outage counted through it). (The first process
    ran a fixed 1.6 s before; on a loaded CI host its silence reached the schedule only as it stopped, and no
    pass was left to give up on anything.)"""
    settings = small_settings(redis_url)
    span = schedule_span(settings)
    began = time.time()
    receiver = HangingReceiver([(began, began + 600)])
    flow = Flow(r, receiver.url, name="pre")

    def gave_up() -> list[str]:
        pipe = r.pipeline(transaction=False)
        rids = list(flow.ended)
        for rid in rids:
            pipe.hget(keys.request(rid), "cbe")
        return [rid for rid, cbe in zip(rids, pipe.execute(), strict=True) if (cbe or "").startswith(GAVE_UP)]

    try:
        run_delivery(settings, seconds=15.0, produce=lambda: flow.run(15.0, began=began), until=lambda: bool(gave_up()))
        hang_ends = time.time()
        receiver.hangs = [(began, hang_ends)]
        assert gave_up()  # it gave up on what waited, while the silence lasted
        seen = r.hget(keys.CALLBACKS_SILENT, callbacks.callback_origin(receiver.url))
        assert seen is not None
        since, last = map(int, seen.split())
        assert (last - since) / 1000 >= span, seen  # a silence long enough to give up on what waits
        outage_ends = max(last / 1000 + Delivery(settings, poll_seconds=POLL).silence_gap_ms() / 1000,
                          hang_ends) + 0.5
        rids = [f"{keys.all_buckets()[i % 7]}after{i}" for i in range(150)]
        for rid in rids:
            ended_with_callback(r, rid, f"{receiver.url}/{rid}", ended_ms=int(time.time() * 1000), ttl_ms=600_000)
        time.sleep(max(0.0, outage_ends - time.time()))
        run_delivery(settings, seconds=20.0, until=lambda: all(r.hget(keys.request(rid), "cbs") for rid in rids))
    finally:
        receiver.stop()
    outcome = Counter((r.hget(keys.request(rid), "cbs"), r.hget(keys.request(rid), "cbe")) for rid in rids)
    assert outcome == {("delivered", None): 150}, outcome
    assert not r.hgetall(keys.CALLBACKS_SILENT)  # its first answer ended the silence


def test_a_host_that_answers_again_ends_its_silence_and_nothing_after_fails(redis_url: str, r) -> None:
    """Callbacks at 40 a second for 5 s to a receiver that hangs its first 2.5 s (well past the 0.65-s
    schedule, however late the first pass starts: 1.5 s left a cluster's run short of it 2 times in 10):
    callbacks waiting for it then are failed unsent. Its own places kept trying, so its first answer ends the
    silence: every callback that ended after its last hung attempt was cut (2.8 s) and a pass is delivered,
    none failed, and no silence is left noted."""
    settings = small_settings(redis_url)
    began = time.time()
    hang = 2.5
    receiver = HangingReceiver([(began, began + hang)])
    flow = Flow(r, receiver.url, name="back")
    try:
        run_delivery(settings, seconds=10.0, produce=lambda: flow.run(5.0, began=began),
                     until=lambda: time.time() > began + 5.0 and all(
                         r.hget(keys.request(rid), "cbs") for rid in flow.ended))
    finally:
        receiver.stop()
    outcomes = flow.outcomes()
    recovered = began + hang + settings.webhook_timeout + 2 * POLL
    during = [rid for rid, (_, cbe) in outcomes.items() if (cbe or "").startswith(GAVE_UP)]
    after = Counter(outcomes[rid] for rid, at in flow.ended.items() if at >= recovered)
    assert during, Counter(outcomes.values())  # the hang was long enough to give up on what waited
    assert sum(after.values()) > 50 and after == {("delivered", None): sum(after.values())}, after
    assert not r.hgetall(keys.CALLBACKS_SILENT)


def test_two_slow_spells_separated_by_answers_do_not_add_up(redis_url: str, r) -> None:
    """Callbacks at 40 a second for 3 s to a receiver that hangs for 0.5 s, answers for 0.6 s, then hangs 0.5 s
    again, with 3 attempts (a 1.05-s schedule): each spell's cuts span about 0.5 s, both spells 1.6 s. The
    answers between them end the first silence, so the second starts over: no callback is failed unsent, and
    every one is delivered (a spell's are cut once or twice, then answered)."""
    settings = small_settings(redis_url, attempts=3)
    span = schedule_span(settings)  # 1.05 s
    began = time.time() + 0.2
    spells = [(began, began + 0.5), (began + 1.1, began + 1.6)]
    assert spells[1][1] - spells[0][0] > span and all(end - start < span / 2 for start, end in spells)
    receiver = HangingReceiver(spells)
    flow = Flow(r, receiver.url, name="spell")
    noted: list[tuple[float, str]] = []

    def look(_: float) -> None:
        seen = r.hget(keys.CALLBACKS_SILENT, callbacks.callback_origin(receiver.url))
        if seen:
            noted.append((time.time() - began, seen))

    try:
        run_delivery(settings, seconds=12.0, produce=watching(flow, 3.0, look),
                     until=lambda: time.time() > began + 3.0 and all(
                         r.hget(keys.request(rid), "cbs") for rid in flow.ended))
    finally:
        receiver.stop()
    outcomes = Counter(flow.outcomes().values())
    sinces = {int(seen.split()[0]) for _, seen in noted}
    assert any(at < 1.1 for at, _ in noted) and any(at >= 1.1 for at, _ in noted), noted  # both spells noted
    assert len(sinces) >= 2, noted  # the second silence started over
    assert not any((cbe or "").startswith(GAVE_UP) for _, cbe in outcomes), outcomes
    assert all(cbs == "delivered" for cbs, _ in outcomes), outcomes


def test_a_late_attempt_cannot_undo_a_callback_failed_unsent(redis_url: str) -> None:
    """A give-up leaves the attempt count as it is (no attempt was made): an attempt whose lease lapsed before
    the give-up (a stalled process) still holds that count. Its late outcome must not undo the give-up. Old:
    its `retry` queued again a callback `GET /v1/requests/{id}` reported failed, and it was sent as attempt 2."""
    async def main() -> None:
        redis = (RedisCluster if ON_CLUSTER else Redis).from_url(redis_url, decode_responses=True)
        try:
            rid = "giveupfence01"
            request, due = keys.request(rid), keys.callbacks_due(keys.bucket_of_request(rid))
            await redis.hset(request, mapping={"st": "done", "cb": "http://hooks.example/x"})
            await redis.pexpire(request, 60_000)
            now = int(time.time() * 1000)
            await redis.zadd(due, {rid: now - 1})
            claimed = await callbacks.claim(redis, rid, now_ms=now, lease_ms=100, session_ttl_ms=60_000)
            assert claimed is not None and claimed[0] == 1
            # its lease lapsed; another process's pass finds it due, its host full and silent
            assert await callbacks.give_up(redis, [rid], "silent", now_ms=now + 200, keep_ms=1000) == 1
            for outcome in ("retry", "failed", "delivered"):  # the late attempt's outcome, whatever it is
                later = int(time.time() * 1000)
                assert not await callbacks.settle(redis, rid, 1, outcome, "cut", later + 50, keep_ms=1000), outcome
            view = callbacks.callback_view(await redis.hgetall(request))
            assert (view["status"], view["last_error"]) == ("failed", "silent"), view
            assert await redis.zscore(due, rid) is None
            await asyncio.sleep(0.1)
            assert await callbacks.claim(redis, rid, now_ms=int(time.time() * 1000), lease_ms=100,
                                         session_ttl_ms=60_000) is None
        finally:
            await redis.aclose()

    asyncio.run(main())


class LateFailure(Receiver):
    """A dead receiver behind a gateway: each request is read whole, then after `after` seconds answered
    `status` (a 502 or 504 of the gateway), or with `status` None its connection closed unanswered."""

    def __init__(self, after: float, status: int | None = 504) -> None:
        self.tried = 0
        self.after, self.status = after, status
        super().__init__()

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        self.tried += 1
        time.sleep(self.after)
        if self.status is None:
            handler.close_connection = True  # no answer at all: the sender sees the connection end
            return
        self.reply(handler, self.status)


@pytest.mark.parametrize("slow_after", [1.0, 0.1], ids=["held-and-left", "pushed-back"])
def test_a_healthy_receiver_on_another_port_of_a_silent_host_loses_nothing(
        redis_url: str, r, monkeypatch: pytest.MonkeyPatch, slow_after: float) -> None:
    """A dead receiver (40 callbacks a second for 5 s, every attempt cut) and, from 1.5 s on (its silence past
    the 0.65-s schedule), a healthy one on another port of the same host (10 a second, answered in 10 ms). They
    share the host's 4 places, but not their silence: the dead one's waiting callbacks are failed unsent, which
    leaves the places to the healthy one's, and every healthy callback is delivered at its first attempt. Old
    (the silence keyed by host): the healthy ones waiting for a place were failed unsent, never tried (the
    reviewer's run: 8 of 14, `cbn` None)."""
    monkeypatch.setattr(delivery_module, "SLOW_AFTER_SECONDS", slow_after)
    settings = small_settings(redis_url)
    hole = BlackHole(HOST)
    healthy = HangingReceiver()
    dead = Flow(r, f"{hole.url}/void", name="dead")
    good = Flow(r, healthy.url, per_second=10, name="good")
    assert callbacks.callback_origin(hole.url) != callbacks.callback_origin(healthy.url)
    assert callbacks.callback_host(hole.url) == callbacks.callback_host(healthy.url)
    began = time.time()

    async def produce() -> None:
        await asyncio.gather(dead.run(5.0, began=began), later(good, 1.5, 5.0))

    async def later(flow: Flow, start: float, end: float) -> None:
        await asyncio.sleep(max(0.0, began + start - time.time()))
        await flow.run(end - start)

    try:
        run_delivery(settings, seconds=12.0, produce=produce,
                     until=lambda: time.time() > began + 5.0 and all(
                         r.hget(keys.request(rid), "cbs") for rid in good.ended))
    finally:
        hole.stop()
        healthy.stop()
    fields = {rid: r.hmget(keys.request(rid), "cbs", "cbe", "cbn") for rid in good.ended}
    outcome = Counter(tuple(each) for each in fields.values())
    assert len(good.ended) >= 30 and outcome == {("delivered", None, "1"): len(good.ended)}, outcome
    waited = sorted(healthy.taken[f"/{rid}"] - at for rid, at in good.ended.items())
    assert waited[-1] < 1.0, waited[-5:]  # each got a place within about a timeout (0.3 s) here
    dead_gave_up = [rid for rid, (_, cbe) in dead.outcomes().items() if (cbe or "").startswith(GAVE_UP)]
    assert len(dead_gave_up) > 50, Counter(dead.outcomes().values())  # the dead one's backlog still bounded
    assert r.hget(keys.CALLBACKS_SILENT, callbacks.callback_origin(hole.url)) is not None
    assert r.hget(keys.CALLBACKS_SILENT, callbacks.callback_origin(healthy.url)) is None


@pytest.mark.parametrize("status", [504, None], ids=["gateway-504", "connection-closed"])
def test_a_receiver_whose_attempts_fail_only_late_is_silent_too(
        redis_url: str, r, monkeypatch: pytest.MonkeyPatch, status: int | None) -> None:
    """40 callbacks a second for 5 s to a dead receiver behind a gateway: every attempt fails, but only after
    0.25 s (under the 0.3-s timeout, over SLOW_AFTER_SECONDS, 0.2 s here): a 504, or its connection closed
    unanswered. No attempt is a timely success, so the origin is silent as if each were cut: what waits for its
    places is failed unsent once that spans the 0.65-s schedule, and the queue stops growing. Old (only cut
    attempts counted): nothing noted, nothing failed unsent, and the queue grew by about 32 a second (the
    reviewer's run: 40, 72, 108, 140, 172 at 1-5 s)."""
    monkeypatch.setattr(delivery_module, "SLOW_AFTER_SECONDS", 0.2)
    settings = small_settings(redis_url)
    gateway = LateFailure(0.25, status)
    flow = Flow(r, f"{gateway.url}/void", name="late")
    try:
        run_delivery(settings, seconds=5.5, produce=lambda: flow.run(5.0))
    finally:
        gateway.stop()
    outcomes = flow.outcomes()
    gave_up = [rid for rid, (cbs, cbe) in outcomes.items() if cbs == "failed" and (cbe or "").startswith(GAVE_UP)]
    (last_at, queued_late), queued_early = flow.queued[-1], flow.queued_at(1.5)
    assert last_at >= 4.0, flow.queued
    assert len(gave_up) > 50, (Counter(cbs for cbs, _ in outcomes.values()), flow.queued[::5])
    assert queued_late <= queued_early + 15, flow.queued[::5]
    assert queued_late <= 40, flow.queued[::5]
    assert r.hget(keys.CALLBACKS_SILENT, callbacks.callback_origin(gateway.url)) is not None
    assert gateway.tried > 20  # its own places kept trying


def test_a_receiver_whose_attempts_fail_quickly_is_never_silent(redis_url: str, r,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The same gateway answering its 504 in 10 ms: a quick failure while its host has places free is no
    silence (such a receiver drains through the retry schedule, its places turning over fast), so no silence
    spans the schedule and nothing is failed unsent: every callback fails by its own 2 attempts. (A failure at
    a moment all four places are taken is noted, and the next one with a place free deletes it.)"""
    monkeypatch.setattr(delivery_module, "SLOW_AFTER_SECONDS", 0.2)
    settings = small_settings(redis_url)
    gateway = LateFailure(0.01, 504)
    flow = Flow(r, f"{gateway.url}/void", name="quick")
    noted: list[str] = []

    try:
        run_delivery(settings, seconds=10.0, produce=watching(flow, 3.0, lambda _: noted.extend(
                         r.hvals(keys.CALLBACKS_SILENT))),
                     until=lambda: len(flow.ended) > 100 and all(
                         r.hget(keys.request(rid), "cbs") for rid in flow.ended))
    finally:
        gateway.stop()
    outcome = Counter((cbs, cbe, cbn) for cbs, cbe, cbn in
                      (r.hmget(keys.request(rid), "cbs", "cbe", "cbn") for rid in flow.ended))
    assert outcome == {("failed", "HTTP 504", "2"): len(flow.ended)}, outcome
    spans = [int(last) - int(since) for since, last in (note.split() for note in noted)]
    assert max(spans, default=0) < schedule_span(settings) * 1000, spans  # never long enough to give up


def test_an_origin_is_scheme_host_and_port_and_a_hold_lets_go_of_one_origin_only() -> None:
    """The receiver a silence is noted for: the scheme's default port filled in, the host lowercased; another
    port or scheme of one host is another receiver. The hold of a host lets go of a silent origin's callbacks
    only: the others keep their places in it, in order."""
    origin = callbacks.callback_origin
    assert origin("http://Hooks.Example/a") == origin("http://hooks.example:80/b") == "http://hooks.example:80"
    assert origin("https://hooks.example/a") == "https://hooks.example:443"
    assert origin("http://hooks.example:8080/a") != origin("http://hooks.example/a")
    assert origin("http://[::1]:9000/a") == "http://[::1]:9000"
    assert origin("ftp://hooks.example/a") is None and origin("not a url") is None
    rooms = delivery_module.Rooms(per_host=1, concurrency=8, held_per_host=10, slow_after=1.0)
    assert rooms.place("busy", "h", 0.0, "http://h:1") is delivery_module.Placement.START
    for rid, at in [("d1", "http://h:1"), ("g1", "http://h:2"), ("d2", "http://h:1"), ("g2", "http://h:2")]:
        assert rooms.place(rid, "h", 0.0, at) is delivery_module.Placement.HOLD
    assert rooms.drop_held({"http://h:1"}) == {"http://h:1": ["d1", "d2"]}
    assert rooms.held_rids() == ["g1", "g2"] and not rooms.known("d1") and rooms.known("g1")
    rooms.end("busy", 0.1)
    assert rooms.next_held("h", 0.1) == "g1"


def test_a_receiver_failing_fast_behind_a_backlog_is_silent_too(redis_url: str, r) -> None:
    """80 callbacks a second for 6 s to a dead receiver behind a balancer answering 503 in 0.1 s (quicker than
    a slow host's second): its four places drain about 20 attempts a second, 10 callbacks of 2 attempts, so a
    backlog waits and every place stays taken. A failure while all are taken is no success in time: the
    origin is silent, what waits is failed unsent once that spans the schedule, and the queue stops growing.
    Old (only slow failures counted): nothing noted, and the queue grew by about 65 a second (the reviewer's
    run: 85 at 1.1 s, 364 at 5.5 s)."""
    settings = small_settings(redis_url)
    gateway = LateFailure(0.1, 503)
    flow = Flow(r, f"{gateway.url}/void", per_second=80, name="fast503")
    try:
        run_delivery(settings, seconds=6.5, produce=lambda: flow.run(6.0))
    finally:
        gateway.stop()
    outcomes = flow.outcomes()
    gave_up = [rid for rid, (cbs, cbe) in outcomes.items() if cbs == "failed" and (cbe or "").startswith(GAVE_UP)]
    assert flow.queued[-1][0] >= 5.0, flow.queued
    assert len(gave_up) > 100, (Counter(cbs for cbs, _ in outcomes.values()), flow.queued[::5])
    late = [queued for at, queued in flow.queued if at >= 2.0]  # (it rises and falls as a pass gives up)
    assert max(late) <= 120, flow.queued[::5]  # bounded: 11-70 here; old 190 at 2.7 s, 364 at 5.5 s
    assert gateway.tried > 40  # its own places kept trying


def test_a_success_during_a_pass_saves_what_it_would_have_given_up(redis_url: str, r) -> None:
    """A pass read the origin's note (silent long enough) at its start; an attempt of the origin succeeded (its
    note deleted) before the pass reached the give-up: what waits for it is left to wait. Old: the pass's stale
    reading failed them unsent, its message giving the schedule's span for want of a silence."""
    settings = small_settings(redis_url)
    receiver = HangingReceiver()
    origin = callbacks.callback_origin(receiver.url)
    rids = [f"{keys.all_buckets()[i]}savedpass{i}" for i in range(5)]

    async def main() -> None:
        delivery = Delivery(settings, poll_seconds=POLL)
        try:
            now_ms = int(time.time() * 1000)
            span_ms = int(delivery.give_up_after() * 1000) + 1000
            r.hset(keys.CALLBACKS_SILENT, origin, f"{now_ms - span_ms} {now_ms - 100}")
            for i in range(delivery_module.PER_HOST):  # the host's places all taken
                delivery.rooms.begin(f"busy{i}", HOST, time.monotonic())
            for rid in rids:
                ended_with_callback(r, rid, f"{receiver.url}/{rid}", ended_ms=now_ms - 5, ttl_ms=600_000)
            read_due = delivery.read_due

            async def read_due_then_a_success(now_ms: int) -> list[str]:
                due = await read_due(now_ms)
                r.hdel(keys.CALLBACKS_SILENT, origin)  # another process's attempt succeeded meanwhile
                return due

            delivery.read_due = read_due_then_a_success  # type: ignore[method-assign]
            async with httpx.AsyncClient(timeout=5) as http:
                await delivery.deliver_due(http)
        finally:
            await delivery.redis.aclose()

    try:
        asyncio.run(main())
    finally:
        receiver.stop()
    assert not [rid for rid in rids if r.hget(keys.request(rid), "cbs") == "failed"], [
        r.hmget(keys.request(rid), "cbs", "cbe") for rid in rids]


def test_a_silence_that_is_over_is_deleted_when_read(redis_url: str, r) -> None:
    """Notes whose last untimely attempt is older than the gap (an origin no callback names any more) are
    deleted by the pass that reads them; one going on is kept. Old: every one stayed for good, read whole by
    every pass of every process (100,000 of them: 7 ms of the server's time a read)."""
    settings = small_settings(redis_url)
    now_ms = int(time.time() * 1000)
    r.hset(keys.CALLBACKS_SILENT, mapping={f"http://gone{i}.example:80": f"{now_ms - 60_000} {now_ms - 50_000}"
                                           for i in range(200)})
    r.hset(keys.CALLBACKS_SILENT, "http://going-on.example:80", f"{now_ms - 2_000} {now_ms}")

    async def main() -> None:
        delivery = Delivery(settings, poll_seconds=POLL)
        try:
            async with httpx.AsyncClient(timeout=5) as http:
                await delivery.deliver_due(http)
        finally:
            await delivery.redis.aclose()

    asyncio.run(main())
    assert list(r.hgetall(keys.CALLBACKS_SILENT)) == ["http://going-on.example:80"]
