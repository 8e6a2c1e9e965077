"""`sluicegate webhooks`: delivers callbacks of ended requests and folds usage counts.

Each pass (every `poll_seconds`) finds the buckets with due callbacks (one pipelined ZCOUNT over the 1024
buckets, as the scheduler's repair pass does: a bucket's `cb` zset shares the hash tag of its requests, so
the terminal step can queue a delivery atomically on a cluster) and starts a delivery task for each due
one it has room for, then returns without waiting for them: the next pass starts what became due
meanwhile, whatever the receivers of earlier ones are doing. A task claims its callback for one attempt
(sessions/callbacks.py) and POSTs the request's final status, signed, to its callback URL. A 2xx
delivers it; anything else (an error status, a timeout, a refused connection) retries it after
--webhook-backoff seconds, doubling, until --webhook-max-attempts, then marks it failed. The host is
checked against --webhook-allow again before every attempt (the list may have shrunk since the
submit); redirects are never followed (they could lead anywhere). Workers never wait on any of this.

The work in flight is bounded twice, and a callback with no room waits, unclaimed, for a later pass; one
whose host is full has its due time moved on by a share of --webhook-timeout (`host_full_wait`), so that
a dead receiver's growing backlog neither fills the front of its bucket (a pass reads BATCH a bucket,
oldest first: callbacks behind them would never be read) nor is read again every pass. PER_HOST (4)
attempts at once per receiver host (the host of the URL, as --webhook-allow names it; any port or path of
it counts together): a receiver that answers slowly or never (an attempt is then cut at
--webhook-timeout) holds back only callbacks to its own host, never those to healthy receivers.
CONCURRENCY (64) attempts at once in all, to bound the process's sockets and tasks (httpx's pool is sized
to it, so no attempt waits on the pool); it is PER_HOST times 16, so with up to 16 hosts in
--webhook-allow it never binds before the per-host bound does, and with more it takes 16 slow hosts at
once to fill it. The bound is per host, not per URL or port, because a host is what the operator allowed:
one tenant cannot take every slot by spreading its callbacks over paths or ports of its own host, though
a slow path on a host shared by several tenants does take that host's slots. A pass also skips the
callbacks already in flight in this process (a set of their request ids): the claim would refuse them
anyway, and this spares the useless claims.

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
from typing import Any

import httpx
import orjson
from redis.exceptions import RedisError

from sluicegate.sessions import callbacks, keys, usage
from sluicegate.sessions.connect import UNAVAILABLE, async_client
from sluicegate.sessions.status import request_view
from sluicegate.settings import Settings
from sluicegate.webhooks.signing import HEADER, signature

log = logging.getLogger(__name__)
POLL_SECONDS = 1.0  # between passes over the buckets (a delivery is due within about this long)
FOLD_SECONDS = 10.0  # between usage folds (reads fold too: this only keeps the pending hashes small)
BATCH = 100  # callbacks read per bucket and pass
CONCURRENCY = 64  # deliveries in flight at once, in all
PER_HOST = 4  # deliveries in flight at once to one receiver host
SETTLE_SECONDS = 2.0  # past an attempt's cap, for its outcome to be written when the process stops


class Delivery:
    def __init__(self, settings: Settings, *, poll_seconds: float = POLL_SECONDS) -> None:
        assert settings.redis_url
        self.settings = settings
        self.hosts = settings.webhook_hosts()
        self.poll_seconds = poll_seconds
        self.lease_ms = int((settings.webhook_timeout + 10) * 1000)
        self.redis: Any = async_client(settings.redis_url, cluster=settings.redis_cluster, decode_responses=True)
        self.in_flight: dict[str, asyncio.Task[None]] = {}  # request id -> its delivery task
        self.per_host: Counter[str] = Counter()  # receiver host -> deliveries in flight to it

    async def run(self, stop: asyncio.Event) -> None:
        """Pass after pass until `stop`, then the deliveries in flight are drained; a store outage is logged
        and waited out."""
        next_fold = 0.0
        async with httpx.AsyncClient(timeout=self.settings.webhook_timeout, follow_redirects=False,
                                     trust_env=False, limits=httpx.Limits(max_connections=CONCURRENCY)) as http:
            try:
                while not stop.is_set():
                    try:
                        if self.hosts:
                            await self.deliver_due(http)
                        if time.monotonic() >= next_fold:
                            await usage.fold(self.redis)
                            next_fold = time.monotonic() + FOLD_SECONDS
                    except (*UNAVAILABLE, RedisError) as error:
                        log.warning("store unavailable (%s); retrying", error)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.poll_seconds)
                await self.drain(self.settings.webhook_timeout + SETTLE_SECONDS)  # each attempt is capped
            finally:
                await self.drain(0)  # cancelled or failed: cut whatever is still in flight, leak nothing
                await self.redis.aclose()

    async def deliver_due(self, http: httpx.AsyncClient) -> int:
        """One pass: starts a delivery task for each callback due now that is not in flight here already
        and has room (CONCURRENCY in all, PER_HOST per receiver host; the others wait, due, for a later
        pass); returns how many it started, without waiting for them (`drain` does)."""
        if len(self.in_flight) >= CONCURRENCY:
            return 0
        now_ms = int(time.time() * 1000)
        buckets = keys.all_buckets()
        pipe = self.redis.pipeline(transaction=False)
        for bucket in buckets:
            pipe.zcount(keys.callbacks_due(bucket), "-inf", now_ms)
        counts = await pipe.execute()
        due: list[str] = []
        for bucket in (b for b, n in zip(buckets, counts, strict=True) if n):
            rids = await self.redis.zrangebyscore(keys.callbacks_due(bucket), "-inf", now_ms, start=0, num=BATCH)
            due += (rid for rid in rids if rid not in self.in_flight)
        if not due:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for rid in due:
            pipe.hget(keys.request(rid), "cb")  # its host, to count it against its bound before claiming it
        urls = await pipe.execute()
        started = 0
        waiting: dict[str, int] = {}  # a full host's callbacks: request id -> its next due time
        for rid, url in zip(due, urls, strict=True):
            if len(self.in_flight) >= CONCURRENCY:
                break
            host = (callbacks.callback_host(url) if url else None) or ""  # "": the claim will drop it
            if host and self.per_host[host] >= PER_HOST:
                waiting[rid] = now_ms + int(self.host_full_wait() * 1000)
                continue
            self.start(http, rid, host)
            started += 1
        if waiting:  # XX GT: only moved later, and never back into the queue once a claim settled it
            pipe = self.redis.pipeline(transaction=False)
            for rid, due_ms in waiting.items():
                pipe.zadd(keys.callbacks_due(keys.bucket_of_request(rid)), {rid: due_ms}, xx=True, gt=True)
            await pipe.execute()
        return started

    def host_full_wait(self) -> float:
        """How long a callback whose host is full waits before a pass looks at it again: about as long as
        one of the host's places takes to free when its receiver never answers, at least a poll."""
        return max(self.poll_seconds, self.settings.webhook_timeout / PER_HOST)

    def start(self, http: httpx.AsyncClient, rid: str, host: str) -> None:
        task = asyncio.create_task(self.deliver(http, rid), name=f"callback {rid}")
        self.in_flight[rid] = task
        self.per_host[host] += 1
        task.add_done_callback(lambda done: self.finished(rid, host, done))

    def finished(self, rid: str, host: str, task: asyncio.Task[None]) -> None:
        """A delivery task ended: free its room, and log what it raised (the callback stays queued: due again
        at once if it was not claimed yet, else after its lease)."""
        self.in_flight.pop(rid, None)
        self.per_host[host] -= 1
        if self.per_host[host] <= 0:
            del self.per_host[host]
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, (*UNAVAILABLE, RedisError)):
            log.warning("callback of %s: store unavailable (%s); it is tried again later", rid, error)
        elif error is not None:
            log.error("callback of %s: delivery failed; it is tried again later", rid, exc_info=error)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait for the deliveries in flight (up to `timeout` seconds; None: as long as they take), then
        cancel those still running and wait for them to end: nothing is left in flight on return."""
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
        claimed = await callbacks.claim(self.redis, rid, now_ms=int(time.time() * 1000), lease_ms=self.lease_ms)
        if claimed is None:
            return
        attempt, fields = claimed
        url = fields["cb"]
        if not callbacks.callback_allowed(url, self.hosts):
            log.warning("callback of %s not sent: its host is not in --webhook-allow any more", rid)
            await callbacks.settle(self.redis, rid, attempt, "failed", "host not in --webhook-allow")
            return
        error = await self.post(http, url, rid, fields)
        if error is None:
            await callbacks.settle(self.redis, rid, attempt, "delivered")
            log.info("callback of %s delivered (attempt %d)", rid, attempt)
        elif attempt >= self.settings.webhook_max_attempts:
            await callbacks.settle(self.redis, rid, attempt, "failed", error)
            log.warning("callback of %s failed after %d attempts: %s", rid, attempt, error)
        else:
            delay = self.settings.webhook_backoff * 2 ** (attempt - 1) * random.uniform(0.9, 1.1)
            await callbacks.settle(self.redis, rid, attempt, "retry", error, int((time.time() + delay) * 1000))
            log.info("callback of %s: attempt %d failed (%s); retrying in %.1f s", rid, attempt, error, delay)

    async def post(self, http: httpx.AsyncClient, url: str, rid: str, fields: dict[str, str]) -> str | None:
        """One signed POST of the request's final status; None when the receiver took it (2xx), else why not."""
        view = request_view(rid, fields)
        view.pop("callback", None)  # its own delivery's state is not part of the request's final status
        body = orjson.dumps(view)
        assert self.settings.webhook_secret  # the settings refuse --webhook-allow without it
        headers = {"content-type": "application/json", HEADER: signature(self.settings.webhook_secret, body),
                   "user-agent": "sluicegate-webhooks"}
        try:
            # The whole attempt is capped: httpx's timeout bounds each read, and a receiver that trickles its
            # answer a byte at a time would hold one of its host's slots (PER_HOST) for as long and outlive
            # the claim's lease (webhook_timeout + 10 s), which another process would then claim again.
            async with asyncio.timeout(self.settings.webhook_timeout):
                response = await http.post(url, content=body, headers=headers)
        except TimeoutError:
            return f"no whole answer within {self.settings.webhook_timeout:g} s (--webhook-timeout)"
        except httpx.HTTPError as error:
            return f"{type(error).__name__}: {error}"[:300]
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"
