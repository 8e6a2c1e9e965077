"""`sluicegate webhooks`: delivers callbacks of ended requests and folds usage counts.

Each pass (every `poll_seconds`) finds the buckets with due callbacks (one pipelined ZCOUNT over the 1024
buckets, as the scheduler's repair pass does: a bucket's `cb` zset shares the hash tag of its requests, so
the terminal step can queue a delivery atomically on a cluster) and starts a delivery task for each due
one it has room for, then returns without waiting for them: the next pass starts what became due
meanwhile, whatever the receivers of earlier ones are doing. A task claims its callback for one attempt
(sessions/callbacks.py) and POSTs the request's final status, signed, to its callback URL. A 2xx
delivers it (only the answer's status counts: at most ANSWER_READ bytes of its body are read, and a body
cut short, or still coming when the attempt's cap ends, delivers it all the same); anything
else (an error status, a timeout, a refused connection, a URL httpx refuses) retries it after
--webhook-backoff seconds, doubling, until --webhook-max-attempts, then marks it failed. The host is
checked against --webhook-allow again before every attempt (the list may have shrunk since the
submit); redirects are never followed (they could lead anywhere). A process with no host allowed at all
(callbacks off, the default) still makes a pass with each usage fold, to mark failed what an emptied list
left pending. Workers never wait on any of this.

The work in flight is bounded twice (webhooks/rooms.py): PER_HOST (4) attempts at once per receiver host
(the host of the URL, as --webhook-allow names it; any port or path of it counts together), so a receiver
that answers slowly or never (an attempt is then cut at --webhook-timeout) holds back only callbacks to
its own host, never those to healthy receivers; and CONCURRENCY (64) attempts at once in all, to bound the
process's sockets and tasks (httpx's pool is sized to it, so no attempt waits on the pool). CONCURRENCY is
PER_HOST times 16, so with up to 16 hosts in --webhook-allow it never binds before the per-host bound
does, and with more it takes 16 slow hosts at once to fill it. The bound is per host, not per URL or
port, because a host is what the operator allowed: one tenant cannot take every slot by spreading its
callbacks over paths or ports of its own host, though a slow path on a host shared by several tenants
does take that host's slots. Both bounds are per process: N processes may send a host N times PER_HOST.

A due callback whose host is full waits in one of two ways. While the host turns over (none of its
attempts has run SLOW_AFTER_SECONDS yet), up to HELD_PER_HOST of them are held here, unclaimed, and each
starts the moment one of the host's places frees; more than that are pushed back by their turn (behind
what is already due: a fast host's backlog in one bucket never hides another host's callbacks), and a
pass comes early (at least MIN_PASS_GAP after the last) once the held ones are all started and one of
those is due: a fast receiver gets its callbacks as fast as it answers them, not PER_HOST a poll. A pass
reads past the held callbacks at the front of a bucket (BATCH more than it holds there), and pages on (BATCH a
page, up to PAGES a bucket and PAGED past the first pages in all) while none of a bucket's callbacks read was
left due for want of a place in all: a host's backlog at the front of a bucket (thousands, after an outage)
hides no other host's callback behind it for more than a pass or two. With more backlogged buckets than PAGED
reaches, a pass pages on from the bucket after the last one the pass before paged (`page_from`), round the
buckets: each gets its pages in turn, not only the first ones in bucket order. Past a bucket's first page, a
callback past its host's full hold is left due where it is (the early pass reads it first), not pushed back by
a turn guessed before the host's answer time is known; read again by each pass that follows (early ones too)
until its host takes it, it costs that pass a row and an HGET of its URL: draining one bucket's 1,500 to a fast
host reads about 6.5 URLs a callback, where a single page read 2 (and took three times as long). Once the host is
slow (a receiver that answers late or never), its due callbacks, the held ones included, have their due
time moved on by their turn, the first a share of --webhook-timeout (`host_full_wait`), so that a dead
receiver's growing backlog neither fills the front of its bucket (a pass reads at most PAGES of BATCH a
bucket, oldest first: callbacks behind them would never be read) nor is read again every pass. A turn (webhooks/rooms.py
`Rooms.turn`) is a callback's place in its host's queue: PER_HOST of them about every time the host's
places all free (`turn_wait`), so a waiting callback is read about once per turn it can get, and a
backlog costs the store about what its host's turnover does, not a few commands a callback every pass;
but one push moves a callback at most about a --webhook-timeout (`push_cap`), and a slow host's queue
starts over once it is no longer slow: a receiver that recovers gets its backlog within about a timeout,
not at the turns guessed while it was slow (a dead one's is read about once a timeout).
A pass skips the callbacks in flight or held here: the claim would refuse the ones in flight anyway, and
this spares the useless claims. Whatever waits (pushed back, held, or left due because every place is
taken: a full process still reads what is due each pass, as any pass does, and still pushes back what
waits for a full host) has its request kept until it is due and the longer of a lease and the session's
TTL more, in the same call (sessions/callbacks.py `push_back`, one round trip a pass), as a claim and a
retry keep it: a backlog that outlasts the session's TTL drops none of it, nor does a delivery outage (a
restart, a deploy) shorter than that TTL around its due time.

A wait is bounded by its receiver's silence, not by the callback's age (a give-up counted from a request's
end failed healthy receivers' callbacks after a delivery outage). The receiver is the callback URL's origin
(scheme, host, port: `callbacks.callback_origin`), not its host: a healthy receiver on another port of a
dead one's host must not have its callbacks failed for it (they share the host's places all the same). An
attempt that gets no timely success notes its origin silent in the store (since when, and its latest such
attempt: `callbacks.note_silent`, one hash every process writes): one cut at --webhook-timeout, or one that
fails (any status but a 2xx, any error) only after SLOW_AFTER_SECONDS, as a dead receiver behind a gateway
that answers 502 or 504 late, or a connection that takes seconds to fail, does; and so does any failure while
every place of its host is taken (a backlog waits: a receiver failing at once, a balancer's instant 503 with
no healthy target, drains no faster than its places allow). A 2xx, or a failure that comes sooner while the
host has places free (such a receiver drains through the retry schedule), deletes the note, so separate slow
spells never add up, and nor does a time no attempt saw (such an attempt more than `silence_gap_ms` after the last
starts the silence over: a delivery outage is no silence). A callback whose own origin has been silent for
the retry schedule's whole span (`give_up_after`: every backoff and every attempt's timeout, about 715 s by
default) and that would wait for its full host is failed unsent instead (`callbacks.give_up`), as a last
failed attempt would fail it. So is one of it held here (`Rooms.drop_held`, at the start of a pass), and in
a pass such callbacks are placed after the others: the hold and the places of a host shared with a silent
origin go to its other origins' callbacks first. Those released from the hold for a host turned slow
(`Rooms.release_slow`, of origins not silent too long) are pushed back as before, and judged when due
again. The origin's own places keep trying, so one that answers again is seen at its next attempt and
nothing more fails; a dead receiver's backlog is then what its places and their retries hold, not every
callback that ended since it died. A callback due while the receiver is still silent, up to its first
success, is failed as well: once a receiver has given no success for that span, what comes due before one is
not waited for. Each pass reads the notes (one HGETALL; a note whose silence is over, its last such attempt
more than `silence_gap_ms` old, is deleted then, so the hash holds only silences going on), a give-up reads
its origins' notes again first (a success meanwhile saves their callbacks), and an attempt deletes one only
when its process saw it: a success of an origin that is not silent costs no command.

On stop, the attempts in flight get up to --webhook-timeout (their own cap) plus SETTLE_SECONDS to end
(an attempt cut by its cap then still records why); any still running then are cancelled. Any number of
these processes may run: a claim holds a callback for one attempt (its lease: the timeout plus a margin),
and a process killed or stopped mid-attempt leaves it queued, due again after the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from redis.exceptions import RedisError

from sluicegate.sessions import callbacks, keys, usage
from sluicegate.sessions.connect import UNAVAILABLE, async_client
from sluicegate.sessions.status import request_view
from sluicegate.settings import Settings
from sluicegate.webhooks.rooms import Placement, Rooms
from sluicegate.webhooks.signing import HEADER, signature

log = logging.getLogger(__name__)
POLL_SECONDS = 1.0  # between passes over the buckets (a delivery is due within about this long)
FOLD_SECONDS = 10.0  # between usage folds (reads fold too: this only keeps the pending hashes small)
BATCH = 100  # callbacks read per bucket and pass, a page (more pages while all those read wait: PAGES)
PAGES = 8  # pages of BATCH read at most per bucket and pass, while none read is left due for want of room
PAGED = 20 * BATCH  # callbacks read past the buckets' first pages in one pass, in all
CONCURRENCY = 64  # deliveries in flight at once, in all
PER_HOST = 4  # deliveries in flight at once to one receiver host
HELD_PER_HOST = 100  # due callbacks held for a full host that turns over, each started as a place frees
SLOW_AFTER_SECONDS = 1.0  # a host with an attempt this old is slow: its waiting callbacks are pushed back
MIN_PASS_GAP = 0.05  # between a pass and an early one (a freed place wants callbacks left due)
ANSWER_READ = 16 * 1024  # bytes of a receiver's answer read at most (only its status is used)
SETTLE_SECONDS = 2.0  # past an attempt's cap, for its outcome to be written when the process stops
HTTPX_CUTS = (httpx.ConnectTimeout, httpx.ReadTimeout, httpx.WriteTimeout)  # httpx's bounds (the timeout's too)


class Unanswered(str):
    """The error of an attempt cut at --webhook-timeout (no whole answer within it): it notes its origin silent
    however long it took (a timeout shorter than SLOW_AFTER_SECONDS too)."""


@dataclass
class Cursor:
    """How far a pass has read a bucket's due callbacks (they are read by due time, then member, as stored)."""

    score: float  # the due time (ms) of the last one read
    at_score: int  # how many read have that due time: the next page starts past them
    more: bool  # its last page was as long as asked: more may be due behind it


class Delivery:
    def __init__(self, settings: Settings, *, poll_seconds: float = POLL_SECONDS) -> None:
        assert settings.redis_url
        self.settings = settings
        self.hosts = settings.webhook_hosts()
        self.poll_seconds = poll_seconds
        self.lease_ms = int((settings.webhook_timeout + 10) * 1000)
        self.session_ttl_ms = settings.session_ttl * 1000  # a queued callback's request outlives it (callbacks.py)
        self.redis: Any = async_client(settings.redis_url, cluster=settings.redis_cluster, decode_responses=True)
        self.in_flight: dict[str, asyncio.Task[None]] = {}  # request id -> its delivery task
        self.rooms = Rooms(per_host=PER_HOST, concurrency=CONCURRENCY, held_per_host=HELD_PER_HOST,
                           slow_after=SLOW_AFTER_SECONDS)
        self.early_pass = asyncio.Event()  # set when a freed place wants callbacks a pass left due
        self.handing_on = True  # a freed place starts a held callback; off once the process stops
        self.silent: dict[str, tuple[int, int]] = {}  # origin -> its silence (ms: since, last), read each pass
        self.cursors: dict[str, Cursor] = {}  # bucket -> how far this pass has read its due callbacks
        self.bucket_at = {bucket: at for at, bucket in enumerate(keys.all_buckets())}  # bucket -> its place
        self.page_from = 0  # the place (bucket_at) of the bucket paged first: past the last one paged a pass

    async def run(self, stop: asyncio.Event) -> None:
        """Pass after pass until `stop`, then the deliveries in flight are drained; a store outage is logged
        and waited out."""
        next_fold = 0.0
        async with httpx.AsyncClient(timeout=self.settings.webhook_timeout, follow_redirects=False,
                                     trust_env=False, limits=httpx.Limits(max_connections=CONCURRENCY)) as http:
            try:
                while not stop.is_set():
                    try:
                        fold_due = time.monotonic() >= next_fold
                        if self.hosts or fold_due:  # none allowed: only to fail what an emptied list left
                            await self.deliver_due(http)
                        if fold_due:
                            await usage.fold(self.redis)
                            next_fold = time.monotonic() + FOLD_SECONDS
                    except (*UNAVAILABLE, RedisError) as error:
                        log.warning("store unavailable (%s); retrying", error)
                    await self.pause(stop)
                await self.drain(self.settings.webhook_timeout + SETTLE_SECONDS)  # each attempt is capped
            finally:
                await self.drain(0)  # cancelled or failed: cut whatever is still in flight, leak nothing
                await self.redis.aclose()

    async def pause(self, stop: asyncio.Event) -> None:
        """Until the next pass: a poll, or less (at least MIN_PASS_GAP) when a freed place wants one."""
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.early_pass.wait())]
        try:
            done, _ = await asyncio.wait(waits, timeout=self.poll_seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        if waits[1] in done and not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), MIN_PASS_GAP)
        self.early_pass.clear()

    async def deliver_due(self, http: httpx.AsyncClient) -> int:
        """One pass: starts a delivery task for each callback due now that is neither in flight nor held here
        and has room (CONCURRENCY in all, PER_HOST per receiver host; webhooks/rooms.py says what waits
        how); returns how many it started, without waiting for them (`drain` does)."""
        now, now_ms = time.monotonic(), int(time.time() * 1000)
        self.rooms.pass_began(now_ms, now)
        self.silent = await callbacks.silent_origins(self.redis, now_ms=now_ms, gap_ms=self.silence_gap_ms())
        silent = {origin for origin in self.silent if self.silent_for(origin, now_ms) is not None}
        await self.give_up(self.rooms.drop_held(silent), now_ms)  # before they are read again as due
        given_up: dict[str, list[str]] = {}  # origin -> waiting callbacks failed unsent: silent too long
        # Released from the hold for their host's slowness: pushed back (judged again when due).
        waiting = {rid: self.slow_turn(host, now_ms, now)
                   for host, rids in self.rooms.release_slow(now).items() for rid in rids}
        due = await self.read_due(now_ms)
        started = 0
        kept: list[str] = []
        paged = 0
        for page in range(PAGES):
            # Past a bucket's first page only while every callback read of it was started or waits for its host
            # (held, pushed back, past its full hold): a backlog at the front of a bucket hides no other host's.
            if page:
                more = self.to_page(kept, (PAGED - paged) // BATCH)
                if not more:
                    break
                paged += len(more) * BATCH
                self.page_from = (self.bucket_at[more[-1]] + 1) % len(self.bucket_at)
                due = await self.read_more(more, now_ms)
            started += await self.place_due(http, due, silent, now, now_ms, waiting, kept, given_up,
                                            first_page=not page)
        await self.give_up(given_up, now_ms)
        await self.push_back(waiting, now_ms, kept=kept)
        return started

    async def place_due(self, http: httpx.AsyncClient, due: list[str], silent: set[str], now: float, now_ms: int,
                        waiting: dict[str, int], kept: list[str], given_up: dict[str, list[str]], *,
                        first_page: bool = True) -> int:
        """Start, hold or push back (into `waiting`) each of these due callbacks, as its host's bound allows;
        `kept` gets those left due for want of a place in all, `given_up` those of origins silent too long
        that would wait. Past a bucket's first page, one past its host's full hold is left due where it is
        (an early pass reads it first once the hold is used up): pushed back, a fast host's backlog would be
        spread over turns guessed before its answer time is known, and drain no faster than those.
        Returns how many it started."""
        if not due:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for rid in due:
            pipe.hget(keys.request(rid), "cb")  # its host, to count it against its bound before claiming it
        urls = await pipe.execute()
        started = 0
        read = [(rid, callbacks.callback_host(url or "") or "", callbacks.callback_origin(url or "") or "")
                for rid, url in zip(due, urls, strict=True)]  # host "": the claim drops it; origin "": never silent
        read.sort(key=lambda each: each[2] in silent)  # silent origins' last: the others take the places first
        for rid, host, origin in read:
            if self.rooms.host_full(host) and origin in silent:
                given_up.setdefault(origin, []).append(rid)  # it would wait, for a receiver that answers nothing
                continue
            placement = self.rooms.place(rid, host, now, origin)
            if placement is Placement.FULL:  # no place left in all: it stays due, its request kept
                kept.append(rid)
            elif placement is Placement.START:
                self.start(http, rid)
                started += 1
            elif placement is Placement.PUSH:  # its turn in its slow host's queue
                waiting[rid] = self.slow_turn(host, now_ms, now)
            elif placement is Placement.LEAVE and first_page:  # behind what is due, by its turn (early pass)
                waiting[rid] = self.rooms.turn(host, now_ms, self.turn_wait(host, now, slow=False), leave=True,
                                               cap=self.push_cap())
        return started

    def to_page(self, kept: list[str], pages: int) -> list[str]:
        """The buckets to read a page more of (at most `pages`): those whose last page was whole and of which no
        callback read was left due for want of a place in all, from `page_from` on, round the buckets: past the
        budget (PAGED) the next pass pages on from where this one stopped, so that every backlogged bucket gets
        its pages in turn, not only the first ones in bucket order, pass after pass."""
        left_due = {keys.bucket_of_request(rid) for rid in kept}
        more = [bucket for bucket, cursor in self.cursors.items() if cursor.more and bucket not in left_due]
        places = len(self.bucket_at)
        more.sort(key=lambda bucket: (self.bucket_at[bucket] - self.page_from) % places)
        return more[:pages]

    def give_up_after(self) -> float:
        """How long a receiver (an origin) may give no attempt a timely success before its callbacks that wait
        for its host's places are failed unsent (seconds): the retry schedule's whole span, every backoff and
        every attempt's timeout (about 715 s by default), as long as a callback first tried when the silence
        began takes to fail."""
        settings = self.settings
        attempts = settings.webhook_max_attempts
        return settings.webhook_backoff * (2 ** (attempts - 1) - 1) + attempts * settings.webhook_timeout

    def silence_gap_ms(self) -> int:
        """The longest time between two untimely attempts of one silence (ms). A full host's place frees when
        one ends (at a cut, at the latest) and takes a callback again within a push (`push_cap`) and a pass,
        ended at most a timeout later; twice that allows for the rest. A longer time without one (no delivery
        process ran, or none had a callback for the origin) starts its silence over: no attempt saw it."""
        return int((self.push_cap() + 2 * (self.settings.webhook_timeout + self.poll_seconds)) * 1000)

    def silent_for(self, origin: str, now_ms: int) -> float | None:
        """How long `origin` has given no attempt a timely success (seconds, as attempts saw it) when that is
        long enough to give up on what waits for it (`give_up_after`) and still going on (its last untimely
        attempt within `silence_gap_ms`); else None."""
        seen = self.silent.get(origin)
        if seen is None:
            return None
        since, last = seen
        span = (last - since) / 1000
        if now_ms - last > self.silence_gap_ms() or span < self.give_up_after():
            return None
        return span

    async def give_up(self, given_up: dict[str, list[str]], now_ms: int) -> None:
        """Fail unsent the waiting callbacks of origins silent too long (origin -> request ids), one pipeline
        an origin; each origin's note read again first (a success during the pass, here or in another process,
        deleted it: its callbacks are left to wait)."""
        if not given_up:
            return
        fresh = await callbacks.silences_of(self.redis, list(given_up))
        for origin in given_up:
            if origin in fresh:
                self.silent[origin] = fresh[origin]
            else:
                self.silent.pop(origin, None)
        for origin, rids in given_up.items():
            span = self.silent_for(origin, now_ms)
            if span is None or not rids:
                continue
            error = (f"the receiver gave no success to any attempt for {span:.0f} s while callbacks waited"
                     f" (each cut at --webhook-timeout, or failed after {self.rooms.slow_after:g} s or more,"
                     " or while its host's places were all taken)")
            failed = await callbacks.give_up(self.redis, rids, error, now_ms=now_ms, keep_ms=self.lease_ms)
            if failed:
                log.warning("%d callbacks to %s failed unsent: %s", failed, origin, error)

    def slow_turn(self, host: str, now_ms: int, now: float) -> int:
        """When a callback waiting for slow `host` is due again (ms): its turn, at most `push_cap` away."""
        return self.rooms.turn(host, now_ms, self.turn_wait(host, now, slow=True), first=self.host_full_wait(),
                               cap=self.push_cap(), slow=True)

    def push_cap(self) -> float:
        """How far one push moves a waiting callback at most (seconds): about a --webhook-timeout (at least a
        poll), so that a receiver that recovers has its backlog read again within that, while a dead one's is
        read about once a timeout, as its places free."""
        return max(self.settings.webhook_timeout, self.poll_seconds)

    async def read_due(self, now_ms: int) -> list[str]:
        """The callbacks due now that are neither in flight nor held here, a bucket's first page: up to BATCH a
        bucket, oldest first, past those held here at its front (`read_more` reads on, from `self.cursors`)."""
        buckets = keys.all_buckets()
        pipe = self.redis.pipeline(transaction=False)
        for bucket in buckets:
            pipe.zcount(keys.callbacks_due(bucket), "-inf", now_ms)
        counts = await pipe.execute()
        self.cursors = {}
        held_in = Counter(keys.bucket_of_request(rid) for rid in self.rooms.held_rids())  # due, at the front
        due_buckets = [b for b, n in zip(buckets, counts, strict=True) if n]
        if not due_buckets:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for bucket in due_buckets:
            pipe.zrangebyscore(keys.callbacks_due(bucket), "-inf", now_ms, start=0, num=BATCH + held_in[bucket],
                               withscores=True)
        pages = await pipe.execute()
        return [rid for bucket, rows in zip(due_buckets, pages, strict=True)
                for rid in self.turn_page(bucket, rows, BATCH + held_in[bucket])]

    async def read_more(self, buckets: list[str], now_ms: int) -> list[str]:
        """The next page (BATCH) of these buckets' due callbacks, after what this pass read of them, by score:
        one a pass started meanwhile was claimed out of the due ones, which shifts no place after it."""
        pipe = self.redis.pipeline(transaction=False)
        for bucket in buckets:
            cursor = self.cursors[bucket]
            pipe.zrangebyscore(keys.callbacks_due(bucket), cursor.score, now_ms, start=cursor.at_score, num=BATCH,
                               withscores=True)
        pages = await pipe.execute()
        return [rid for bucket, rows in zip(buckets, pages, strict=True) for rid in self.turn_page(bucket, rows, BATCH)]

    def turn_page(self, bucket: str, rows: list[tuple[str, float]], asked: int) -> list[str]:
        """Note how far a page of `bucket` (request id, due ms) took its cursor; its callbacks not known here."""
        before = self.cursors.get(bucket)
        if rows:
            score = rows[-1][1]
            at_score = sum(due == score for _, due in rows) + (
                before.at_score if before is not None and before.score == score else 0)
            self.cursors[bucket] = Cursor(score, at_score, len(rows) >= asked)
        elif before is not None:
            before.more = False
        return [rid for rid, _ in rows if not self.rooms.known(rid)]

    async def push_back(self, waiting: dict[str, int], now_ms: int, *, kept: list[str] | None = None) -> None:
        """Move waiting callbacks (a slow host's, or past a fast one's hold) to their next due times (request
        id -> ms), in one round trip; their requests, and those of the callbacks held here or
        `kept` due as they are (read while every place was taken), are kept until then and the longer of a
        lease and the session's TTL more: a backlog longer than the session's TTL drops none of them."""
        await callbacks.push_back(self.redis, waiting, self.rooms.held_rids(), kept=kept or (),
                                  now_ms=now_ms, lease_ms=self.lease_ms, session_ttl_ms=self.session_ttl_ms)

    def host_full_wait(self) -> float:
        """How long the first of a slow host's waiting callbacks waits before a pass looks at it again: about
        as long as one of the host's places takes to free when its receiver never answers, at least a poll
        (those behind it wait their turns, `turn_wait`)."""
        return max(self.poll_seconds, self.settings.webhook_timeout / PER_HOST)

    def turn_wait(self, host: str, now: float, *, slow: bool) -> float:
        """About how often each of a full host's places frees (seconds), for `Rooms.turn`: a slow host's
        attempts' recent length (until one ended, as long as its oldest in flight has run so far: a guess
        short rather than long, so that a slow but live receiver's places do not idle; at least
        SLOW_AFTER_SECONDS, at most the timeout); for a host that
        turns over, half of that length (MIN_PASS_GAP until one ended: as fast as early passes come): its
        LEAVE'd callbacks are read early rather than late, so that none of its places idles (read too early,
        one is only pushed back again, behind the rest)."""
        answer = self.rooms.answer_time(host)
        timeout = self.settings.webhook_timeout
        if slow:
            known = self.rooms.oldest_attempt(host, now) if answer is None else answer
            return min(max(known, self.rooms.slow_after), timeout)
        return MIN_PASS_GAP if answer is None else min(answer, timeout) / 2

    def start(self, http: httpx.AsyncClient, rid: str) -> None:
        """A delivery task for `rid`, whose place `self.rooms` has recorded."""
        task = asyncio.create_task(self.deliver(http, rid), name=f"callback {rid}")
        self.in_flight[rid] = task
        task.add_done_callback(lambda done: self.finished(http, rid, done))

    def finished(self, http: httpx.AsyncClient, rid: str, task: asyncio.Task[None]) -> None:
        """A delivery task ended: its place goes to a callback held for its host, or a pass comes early for
        callbacks left due; what it raised is logged (the callback stays queued: due again at once if it
        was not claimed yet, else after its lease)."""
        self.in_flight.pop(rid, None)
        host = self.rooms.end(rid, time.monotonic())
        if self.handing_on:
            held = self.rooms.next_held(host, time.monotonic())
            if held is not None:
                self.start(http, held)
            if self.rooms.wants_pass(host, int(time.time() * 1000)):
                self.early_pass.set()
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, (*UNAVAILABLE, RedisError)):
            log.warning("callback of %s: store unavailable (%s); it is tried again later", rid, error)
        elif error is not None:
            log.error("callback of %s: delivery failed; it is tried again later", rid, exc_info=error)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait for the deliveries in flight (up to `timeout` seconds; None: as long as they take), then
        cancel those still running and wait for them to end: nothing is left in flight on return. The held
        callbacks are not started (they stay due in the store)."""
        self.handing_on = False
        tasks = set(self.in_flight.values())
        if not tasks:
            return
        pending = tasks
        if timeout is None or timeout > 0:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
            log.warning("%d callback deliveries cut; each is tried again later", len(pending))

    async def deliver(self, http: httpx.AsyncClient, rid: str) -> None:
        try:
            claimed = await callbacks.claim(self.redis, rid, now_ms=int(time.time() * 1000), lease_ms=self.lease_ms,
                                            session_ttl_ms=self.session_ttl_ms)
        except callbacks.Expired:  # ended and expired (--session-ttl) while no delivery process ran
            log.warning("callback of %s dropped: its request expired before it could be sent", rid)
            return
        if claimed is None:
            return
        attempt, fields = claimed
        url = fields["cb"]
        if not callbacks.callback_allowed(url, self.hosts):
            log.warning("callback of %s not sent: its host is not in --webhook-allow any more", rid)
            await callbacks.settle(self.redis, rid, attempt, "failed", "host not in --webhook-allow",
                                   keep_ms=self.lease_ms)
            return
        began = time.monotonic()
        error = await self.post(http, url, rid, fields)
        # No success in time: a cut, a failure that took a slow host's time, or any failure while every place
        # of its host is taken (a backlog waits: a receiver failing fast, an instant 503 of a balancer with no
        # healthy target, drains no faster through its retries than its places allow)
        untimely = error is not None and (isinstance(error, Unanswered)
                                          or time.monotonic() - began >= self.rooms.slow_after
                                          or self.rooms.host_full(self.rooms.host_of.get(rid, "")))
        if error is None:
            await callbacks.settle(self.redis, rid, attempt, "delivered", keep_ms=self.lease_ms)
            log.info("callback of %s delivered (attempt %d)", rid, attempt)
        elif attempt >= self.settings.webhook_max_attempts:
            await callbacks.settle(self.redis, rid, attempt, "failed", error, keep_ms=self.lease_ms)
            log.warning("callback of %s failed after %d attempts: %s", rid, attempt, error)
        else:
            # The request is the payload: kept until its retry is due and as long as a claim keeps it past
            # that (past its session's TTL if need be), so that an outage of the delivery process shorter
            # than the TTL around that time loses nothing.
            delay = self.settings.webhook_backoff * 2 ** (attempt - 1) * random.uniform(0.9, 1.1)
            keep_ms = int(delay * 1000) + callbacks.kept_past_due(self.lease_ms, self.session_ttl_ms)
            await callbacks.settle(self.redis, rid, attempt, "retry", error, int((time.time() + delay) * 1000),
                                   keep_ms=keep_ms)
            log.info("callback of %s: attempt %d failed (%s); retrying in %.1f s", rid, attempt, error, delay)
        await self.note_origin(callbacks.callback_origin(url) or "", untimely=untimely)

    async def note_origin(self, origin: str, *, untimely: bool) -> None:
        """What an attempt says of its receiver's silence: an untimely one (cut at the timeout, failed only after
        SLOW_AFTER_SECONDS, or failed while its host's places were all taken) goes on with it; a success, or
        another failure, ends it (a command
        only when this process knows of a note: read each pass, or written here). Written after its outcome,
        which a store error here must not undo: a note missed only moves a give-up later, and a note left is
        deleted by a later success, once a pass has read it."""
        if not origin:
            return
        try:
            if untimely:
                now_ms = int(time.time() * 1000)
                since = await callbacks.note_silent(self.redis, origin, now_ms=now_ms,
                                                    gap_ms=self.silence_gap_ms())
                self.silent[origin] = (since, now_ms)
            elif self.silent.pop(origin, None) is not None:
                await callbacks.note_answered(self.redis, origin)
        except (*UNAVAILABLE, RedisError) as failure:
            log.warning("callbacks to %s: whether it answers in time not noted (%s)", origin, failure)

    async def post(self, http: httpx.AsyncClient, url: str, rid: str, fields: dict[str, str]) -> str | None:
        """One signed POST of the request's final status; None when the receiver took it (2xx, whatever then
        happens to the rest of its answer), else why not (Unanswered when the attempt was cut at its cap)."""
        view = request_view(rid, fields)
        view.pop("callback", None)  # its own delivery's state is not part of the request's final status
        body = orjson.dumps(view)
        assert self.settings.webhook_secret  # the settings refuse --webhook-allow without it
        headers = {"content-type": "application/json", HEADER: signature(self.settings.webhook_secret, body),
                   "user-agent": "sluicegate-webhooks"}
        status = 0  # the answer's, once its head is read
        try:
            # The whole attempt is capped: httpx's timeout bounds each read, and a receiver that trickles its
            # answer a byte at a time would hold one of its host's slots (PER_HOST) for as long and outlive
            # the claim's lease (webhook_timeout + 10 s), which another process would then claim again.
            async with asyncio.timeout(self.settings.webhook_timeout):
                async with http.stream("POST", url, content=body, headers=headers) as response:
                    status = response.status_code
                    await read_some(response, ANSWER_READ)
        except Exception as error:  # any: one escaping (httpx.InvalidURL is no HTTPError) would never be settled
            if 200 <= status < 300:  # taken: only the rest of the body failed (cut short, or too slow)
                log.info("callback of %s: taken (HTTP %d), its answer's body not read whole (%s)", rid, status,
                         type(error).__name__)
                return None
            if isinstance(error, TimeoutError):
                return Unanswered(f"no whole answer within {self.settings.webhook_timeout:g} s (--webhook-timeout)")
            if isinstance(error, HTTPX_CUTS):  # httpx's own bound, as long, came first
                return Unanswered(f"{type(error).__name__}: {error}"[:300])
            return f"{type(error).__name__}: {error}"[:300]
        if 200 <= status < 300:
            return None
        return f"HTTP {status}"


async def read_some(response: httpx.Response, limit: int) -> None:
    """Read up to `limit` bytes of an answer's body and drop them: only its status counts. A short answer is
    read whole (its connection can then serve the next attempt); a longer one is left unread, and closing the
    response closes its connection, so a receiver answering gigabytes costs no memory here."""
    seen = 0
    async for chunk in response.aiter_raw():
        seen += len(chunk)
        if seen >= limit:
            return
