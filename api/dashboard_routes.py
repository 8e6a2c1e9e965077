"""`GET /dashboard` (one static page, no build step) and the stats stream it follows.

The page holds no data and no secret, so it is served to anyone; it reads everything from
`GET /v1/admin/stats/stream` (an SSE event a second: the `/v1/admin/stats` JSON plus tokens/s and
each tenant's share against its weight, fleet-wide and within each group), which needs the admin key or
a stats stream token (api/stream_tokens.py). Its Content-Security-Policy allows only the page's own inline script and
style (by hash) and connections to this origin, so whatever a stats field holds cannot run or send
the admin key elsewhere.

The store is read once before the stream opens, so a store that is down answers the usual 503 (the
EventSource gives up and the page backs off, 1 s to 10 s) rather than a 200 that fails at once and is
reconnected every second; a store failure on a later tick ends the stream with an `unavailable` event
and one warning line, not a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator
from functools import cache
from importlib import resources
from typing import Any

import orjson
import redis.exceptions
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse
from sse_starlette import EventSourceResponse

from sluicegate.api.admin_routes import stats_document
from sluicegate.api.auth import Principal, require_admin
from sluicegate.api.services import Services, services
from sluicegate.api.stream_tokens import stats_stream_principal
from sluicegate.sessions.connect import UNAVAILABLE
from sluicegate.sessions.metrics_store import read_metrics

log = logging.getLogger(__name__)
router = APIRouter()
RETRY_MS = 1000  # how soon a browser's EventSource reconnects after the stream drops
INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.S)


@cache
def dashboard_page() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy (hashes of its inline script and style), read once."""
    html = (resources.files("sluicegate.api") / "static" / "dashboard.html").read_text()
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for tag, body in INLINE.findall(html):
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        hashes[tag].append(f"'sha256-{digest}'")
    policy = (f"default-src 'none'; script-src {' '.join(hashes['script'])}; style-src {' '.join(hashes['style'])}; "
              "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode(), policy


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    page, policy = dashboard_page()
    return HTMLResponse(page, headers={"Content-Security-Policy": policy, "Cache-Control": "no-store",
                                       "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"})


def series_rates(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[tuple[str, str], float]:
    """Tokens/s of each (group, tenant) between two readings of the `tokens` counters (labels
    `group|priority|tenant`, the priorities summed). A series missing from `before` is new since then: it
    started from 0 (a tenant's first tokens at a priority or in a group count). A counter that went down
    (a reset) counts 0."""
    found: dict[tuple[str, str], float] = {}
    for label, value in after.items():
        delta = max(value - before.get(label, 0.0), 0.0) / seconds if seconds > 0 else 0.0
        group, _, tenant = label.split("|", 2)
        found[(group, tenant)] = found.get((group, tenant), 0.0) + delta
    return found


def rates(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, Any]:
    """Tokens/s overall, by group and by tenant between two readings of the `tokens` counters
    (series_rates). The first reading passes itself as `before`, so what was streamed before the stream
    opened shows no burst."""
    return summed(series_rates(before, after, seconds))


def summed(by_group_tenant: dict[tuple[str, str], float]) -> dict[str, Any]:
    """`tokens_per_second`: the (group, tenant) rates summed overall, by group and by tenant."""
    by_group: dict[str, float] = {}
    by_tenant: dict[str, float] = {}
    for (group, tenant), delta in by_group_tenant.items():
        by_group[group] = by_group.get(group, 0.0) + delta
        by_tenant[tenant] = by_tenant.get(tenant, 0.0) + delta
    return {"total": round(sum(by_group.values()), 1), "by_group": {g: round(v, 1) for g, v in by_group.items()},
            "by_tenant": {t: round(v, 1) for t, v in by_tenant.items()}}


def weights_of(doc: dict[str, Any]) -> dict[str, float]:
    return {t["tenant"]: float(t["weight"]) for t in doc.get("tenants", [])}


def shares_among(weights: dict[str, float], queued: dict[str, int], rate: dict[str, float]) -> list[dict[str, Any]]:
    """Each active tenant (queued, or served since the last event) with its share of the tokens streamed
    against its weight's share among the active ones: fairness is among those that want service."""
    active = sorted(set(queued) | {t for t, v in rate.items() if v > 0})
    total_weight = sum(weights.get(t, 1.0) for t in active) or 1.0
    total_rate = sum(rate.get(t, 0.0) for t in active)
    return [{"tenant": t, "weight": weights.get(t, 1.0), "weight_share": round(weights.get(t, 1.0) / total_weight, 4),
             "tokens_per_second": round(rate.get(t, 0.0), 1),
             "token_share": round(rate.get(t, 0.0) / total_rate, 4) if total_rate else 0.0,
             "queued": queued.get(t, 0)} for t in active]


def tenant_shares(doc: dict[str, Any], by_tenant: dict[str, float]) -> list[dict[str, Any]]:
    """shares_among the whole fleet's tenants: kept as it was for the stream's readers. Fairness is decided
    per group (each group has its own virtual token counters and its own copy of the weights; tenants of
    different groups never compete), which group_tenant_shares shows and the page reads."""
    queued: dict[str, int] = {}
    for depth in doc.get("queue_depth", []):
        queued[depth["tenant"]] = queued.get(depth["tenant"], 0) + depth["queued"]
    return shares_among(weights_of(doc), queued, by_tenant)


def group_tenant_shares(doc: dict[str, Any],
                        by_group_tenant: dict[tuple[str, str], float]) -> dict[str, list[dict[str, Any]]]:
    """shares_among each group's tenants, as the scheduler decides: fleet-wide, two groups of different
    capacity that are each exactly fair look unfair (and unfairness inside one group can hide)."""
    queued: dict[str, dict[str, int]] = {}
    for depth in doc.get("queue_depth", []):
        in_group = queued.setdefault(depth["group"], {})
        in_group[depth["tenant"]] = in_group.get(depth["tenant"], 0) + depth["queued"]
    rate: dict[str, dict[str, float]] = {}
    for (group, tenant), value in by_group_tenant.items():
        rate.setdefault(group, {})[tenant] = value
    weights = weights_of(doc)
    shares = {group: shares_among(weights, queued.get(group, {}), rate.get(group, {}))
              for group in sorted(set(queued) | set(rate))}
    return {group: entries for group, entries in shares.items() if entries}


async def stats_reading(svc: Services) -> tuple[dict[str, Any], dict[str, float]]:
    """The stats document and the `tokens` counters, read now."""
    doc = await stats_document(svc)
    tokens = (await read_metrics(svc.redis, [g["group"] for g in doc["groups"]], only=("tokens",))).get("tokens", {})
    return doc, tokens


async def stats_events(svc: Services, interval: float,
                       first: tuple[dict[str, Any], dict[str, float]]) -> AsyncIterator[bytes]:
    """An event per `interval`: the stats document with `tokens_per_second`, `tenant_share` and
    `tenant_share_by_group`, the first from `first` (read before the stream opened). A store that fails
    later ends the stream: an `unavailable` event, then the end, which the EventSource reconnects after
    `retry` and meets the opening's 503."""
    yield f"retry: {RETRY_MS}\n\n".encode()
    doc, tokens = first
    before, at = tokens, time.monotonic()  # the first reading is its own `before`: no burst
    while True:
        now = time.monotonic()
        by_group_tenant = series_rates(before, tokens, now - at)
        doc["tokens_per_second"] = summed(by_group_tenant)
        doc["tenant_share"] = tenant_shares(doc, doc["tokens_per_second"]["by_tenant"])
        doc["tenant_share_by_group"] = group_tenant_shares(doc, by_group_tenant)
        doc["sent_at"] = round(time.time(), 3)
        before, at = tokens, now
        yield b"event: stats\ndata: " + orjson.dumps(doc) + b"\n\n"
        await asyncio.sleep(interval)
        try:
            doc, tokens = await stats_reading(svc)
        except (redis.exceptions.RedisError, OSError, *UNAVAILABLE) as exc:  # a cluster's: no RedisError
            log.warning("stats stream ended: the store failed: %s: %s", type(exc).__name__, exc)
            yield b"event: unavailable\ndata: " + orjson.dumps({"message": "the queue store (Redis) is unavailable",
                                                                 "sent_at": round(time.time(), 3)}) + b"\n\n"
            return


async def stats_reader(who: Principal = Depends(stats_stream_principal)) -> Principal:
    """The admin (key or stats token), checked before the query is validated: 401, then 403, before 422."""
    require_admin(who)
    return who


@router.get("/v1/admin/stats/stream", responses={200: {"content": {"text/event-stream": {}}}},
            dependencies=[Depends(stats_reader)])
async def stats_stream(request: Request, interval: float = Query(1.0, ge=0.2, le=60.0)) -> EventSourceResponse:
    """The dashboard's feed: admin key, or `?token=` from `POST /v1/stream-tokens {"stats": true}`. The
    first reading is made before the answer starts: a store that is down gets the usual 503."""
    svc = services(request)
    first = await stats_reading(svc)
    return EventSourceResponse(stats_events(svc, interval, first), ping=0, headers={"Cache-Control": "no-store"})
