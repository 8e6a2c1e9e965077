"""`sluicegate webhooks`: delivers callbacks of ended requests and folds usage counts.

Each pass finds the buckets with due callbacks (one pipelined ZCOUNT over the 1024 buckets, as the
scheduler's repair pass does: a bucket's `cb` zset shares the hash tag of its requests, so the terminal
step can queue a delivery atomically on a cluster), claims each due one for one attempt
(sessions/callbacks.py) and POSTs the request's final status, signed, to its callback URL. A 2xx
delivers it; anything else (an error status, a timeout, a refused connection) retries it after
--webhook-backoff seconds, doubling, until --webhook-max-attempts, then marks it failed. The host is
checked against --webhook-allow again before every attempt (the list may have shrunk since the
submit); redirects are never followed (they could lead anywhere). Workers never wait on any of this.

Any number of these processes may run: a claim holds a callback for one attempt (its lease: the
timeout plus a margin), and a process killed mid-attempt leaves it queued, due again after the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
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
BATCH = 100  # callbacks claimed per bucket and pass
CONCURRENCY = 16  # deliveries in flight at once


class Delivery:
    def __init__(self, settings: Settings, *, poll_seconds: float = POLL_SECONDS) -> None:
        assert settings.redis_url
        self.settings = settings
        self.hosts = settings.webhook_hosts()
        self.poll_seconds = poll_seconds
        self.lease_ms = int((settings.webhook_timeout + 10) * 1000)
        self.redis: Any = async_client(settings.redis_url, cluster=settings.redis_cluster, decode_responses=True)
        self.slots = asyncio.Semaphore(CONCURRENCY)

    async def run(self, stop: asyncio.Event) -> None:
        """Pass after pass until `stop`; a store outage is logged and waited out."""
        next_fold = 0.0
        async with httpx.AsyncClient(timeout=self.settings.webhook_timeout, follow_redirects=False,
                                     trust_env=False) as http:
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
            finally:
                await self.redis.aclose()

    async def deliver_due(self, http: httpx.AsyncClient) -> int:
        """One pass: every callback due now, delivered (or rescheduled) concurrently; returns how many."""
        now_ms = int(time.time() * 1000)
        buckets = keys.all_buckets()
        pipe = self.redis.pipeline(transaction=False)
        for bucket in buckets:
            pipe.zcount(keys.callbacks_due(bucket), "-inf", now_ms)
        counts = await pipe.execute()
        due: list[str] = []
        for bucket in (b for b, n in zip(buckets, counts, strict=True) if n):
            due += await self.redis.zrangebyscore(keys.callbacks_due(bucket), "-inf", now_ms, start=0, num=BATCH)
        await asyncio.gather(*(self.deliver(http, rid) for rid in due))
        return len(due)

    async def deliver(self, http: httpx.AsyncClient, rid: str) -> None:
        async with self.slots:
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
            # answer a byte at a time would hold this pass (and every callback due behind it) and outlive
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
