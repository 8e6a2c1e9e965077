"""`sluicegate mcp`: a stdio MCP server, so that an AI assistant (Claude Desktop, an IDE, an agent) can
operate a Sluicegate deployment: look at its queues, set a tenant's weight or a group's quota, inspect a
session, cancel a request. Every tool is one or a few calls of the HTTP API through
sluicegate/client/, to `--url` (env SLUICEGATE_URL) with `--api-key` (env SLUICEGATE_API_KEY, the
admin key for the admin tools when auth is on): the MCP server holds no state and needs no Redis.

Needs the `mcp` extra (`pip install 'sluicegate[mcp]'`); it is imported only when the command runs, so
the rest of the CLI works without it. Like the client, this module must not import the server's
packages (sluicegate.api and friends).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections import Counter, deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

    from sluicegate.client import AsyncClient

QUOTA_FIELDS = ("requests_per_second", "tokens_per_second", "burst", "max_concurrency", "burst_tokens")
IDLE_SECONDS = 0.5  # inspect_session reads a session's events until they pause this long...
READ_BUDGET = 3.0  # ...or for this long at most (a busy session never pauses)
MAX_REQUESTS = 20  # requests whose status inspect_session looks up, the most recent first


def add_command(sub: Any) -> None:
    """Register `sluicegate mcp` on the `sluicegate` subparsers."""
    p = sub.add_parser("mcp", help="a stdio MCP server: tools for AI assistants to operate Sluicegate",
                       description="Serve the Model Context Protocol on stdin/stdout with the tools stats, "
                                   "set_weight, set_quota, inspect_session and cancel_request, each a call of the "
                                   "HTTP API at --url. Needs the mcp extra: pip install 'sluicegate[mcp]'.")
    p.add_argument("--url", default=None, help="the Sluicegate API [env SLUICEGATE_URL] "
                   "(default: http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer (the admin key for the admin "
                   "tools when auth is on) [env SLUICEGATE_API_KEY]")


def run(args: argparse.Namespace) -> int:
    """Serve until stdin closes. Without the extra: one line saying how to get it, exit code 1."""
    try:
        server = build_server(args.url, args.api_key)
    except ImportError as error:
        print(f"sluicegate mcp: needs the mcp extra (pip install 'sluicegate[mcp]'): {error}", file=sys.stderr)
        return 1
    server.run("stdio")
    return 0


def build_server(url: str | None = None, api_key: str | None = None) -> MCPServer:
    """The MCP server and its tools, talking to `url` (default SLUICEGATE_URL, then http://127.0.0.1:8000)."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    from sluicegate.client import AsyncClient, SluicegateError

    url = url or os.environ.get("SLUICEGATE_URL") or None
    server = MCPServer("sluicegate", instructions=(
        "Operate a Sluicegate deployment (a priority scheduler in front of LLM inference servers): queue depth, "
        "running requests and workers (stats), tenants' fair-share weights (set_weight), groups' rate quotas "
        "(set_quota), a session's recent events and its requests' statuses (inspect_session), cancelling a "
        "request (cancel_request)."), log_level="WARNING")

    @contextlib.asynccontextmanager
    async def connect() -> AsyncIterator[AsyncClient]:
        """A client for one tool call; what the API refuses (or no answer) is the tool's error, with its
        message (any other exception is a crash, which MCP reports without its text)."""
        try:
            async with AsyncClient(url, api_key=api_key, reconnect_timeout=5.0) as client:
                yield client
        except SluicegateError as error:
            raise ToolError(str(error)) from error

    @server.tool()
    async def stats() -> dict[str, Any]:
        """Queue depth by group, priority class and tenant; running requests; live workers with their slots;
        each group's quota and each tenant's weight (GET /v1/admin/stats)."""
        async with connect() as client:
            return await client.stats()

    @server.tool()
    async def set_weight(tenant: str, weight: float) -> dict[str, Any]:
        """Set a tenant's fair-share weight (default 1.0): inside a priority class, waiting tenants get tokens
        in proportion to their weights (3.0 gets three times what a 1.0 tenant gets). Returns the tenant."""
        async with connect() as client:
            return await client.set_weight(tenant, weight)

    @server.tool()
    async def set_quota(group: str, requests_per_second: float | None = None, tokens_per_second: float | None = None,
                        burst: int | None = None, max_concurrency: int | None = None,
                        burst_tokens: float | None = None, remove: list[str] | None = None) -> dict[str, Any]:
        """Set a group's rate quota. Only the fields given change; `remove` names fields to make unlimited
        again (requests_per_second, tokens_per_second, max_concurrency) or to put back to their default
        (burst: 1 request; burst_tokens: one second of tokens_per_second). With no field and no `remove`,
        returns the group's quota as it is. Returns the group."""
        given = {"requests_per_second": requests_per_second, "tokens_per_second": tokens_per_second,
                 "burst": burst, "max_concurrency": max_concurrency, "burst_tokens": burst_tokens}
        fields: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
        for name in remove or []:
            if name not in QUOTA_FIELDS:
                raise ToolError(f"remove: {name!r} is not a quota field ({', '.join(QUOTA_FIELDS)})")
            if name in fields:
                raise ToolError(f"{name} is both given and removed")
            fields[name] = None
        async with connect() as client:
            if not fields:
                found = [g for g in await client.groups() if g.get("group") == group]
                if not found:
                    raise ToolError(f"no group {group!r} (GET /v1/admin/groups lists none of that name)")
                return found[0]
            return await client.set_quota(group, **fields)

    @server.tool()
    async def inspect_session(session_id: str, max_events: int = 30, include_output: bool = False) -> dict[str, Any]:
        """A session's recent events (the last `max_events`; token events are counted per request rather than
        listed) and the status of its requests, most recent first (GET /v1/requests/{id}; with
        `include_output` their text so far too). A request already gone (its record expires a TTL after it
        ends, while the session's log lives on with later requests) is `{"request_id", "status": "expired"}`."""
        async with connect() as client:
            events, tokens = await _recent_events(client, session_id, max(1, min(max_events, 1000)))
            rids = list(dict.fromkeys(e["data"]["request_id"] for e in reversed(events) if "request_id" in e["data"]))
            rids += [rid for rid in reversed(tokens) if rid not in rids]
            requests = []
            for rid in rids[:MAX_REQUESTS]:
                try:
                    requests.append(await client.request(rid, include_output=include_output))
                except SluicegateError as error:
                    if error.status != 404:
                        raise
                    requests.append({"request_id": rid, "status": "expired"})
        return {"session_id": session_id, "events": events, "tokens_seen": dict(tokens), "requests": requests}

    @server.tool()
    async def cancel_request(request_id: str) -> dict[str, Any]:
        """Cancel a request, queued or running (a running one stops at once and its slot is freed). Returns
        the request's status after the cancel."""
        async with connect() as client:
            await client.cancel(request_id)
            return await client.request(request_id)

    return server


async def _recent_events(client: AsyncClient, session_id: str, limit: int) -> tuple[list[dict[str, Any]], Counter[str]]:
    """The session's events from its oldest kept one, read until they pause for IDLE_SECONDS (or for
    READ_BUDGET s at most): the last `limit` that are not tokens, and the tokens counted per request.
    The event stream is the API's only view of a session's log (it never ends by itself). The answer's
    head is waited READ_BUDGET s too: an API that takes the connection and never answers (stopped, or
    behind a hung proxy) is `no_answer`, not a tool call that never returns."""
    import httpx
    from httpx_sse import SSEError, aconnect_sse

    from sluicegate.client.addresses import _session_path
    from sluicegate.client.errors import _aerror_body, _error_from, _not_an_event_stream, _undecodable, _unreachable

    kept: deque[dict[str, Any]] = deque(maxlen=limit)
    tokens: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READ_BUDGET
    path = f"{_session_path(session_id)}/events"
    last_id = 0  # the API's event ids start at 1 and only increase
    try:
        # read=READ_BUDGET bounds the wait for the head; the reads after it are bounded by wait_for below
        async with aconnect_sse(client.http, "GET", path,
                                timeout=httpx.Timeout(client.timeout, read=READ_BUDGET)) as source:
            if source.response.status_code != 200:
                raise _error_from(source.response, await _aerror_body(source.response))
            events = source.aiter_sse()
            while (wait := min(IDLE_SECONDS, deadline - loop.time())) > 0:
                try:
                    sse = await asyncio.wait_for(anext(events), wait)
                except (TimeoutError, StopAsyncIteration):
                    break
                except httpx.DecodingError as error:  # a RequestError, not a TransportError
                    raise _undecodable(source.response, error) from error
                # A keep-alive comment still comes out as an SSE: event "message", and the id of the event
                # before it (httpx-sse keeps the last id, as EventSource does). Every log event is named and
                # has a new id, as the client's _Follow.accept checks.
                event_id = int(sse.id) if sse.id.isascii() and sse.id.isdigit() else 0
                if sse.event in ("", "message") or event_id <= last_id:
                    continue
                last_id = event_id
                data: dict[str, Any] = {}
                with contextlib.suppress(ValueError):
                    data = sse.json() if sse.data else {}
                if sse.event == "token":
                    tokens[str(data.get("request_id"))] += 1
                else:
                    kept.append({"id": event_id, "event": sse.event, "data": data})
    except SSEError as error:  # first: it is a TransportError too, but an answer did come (another app's page)
        raise _not_an_event_stream(error) from error
    except httpx.TransportError as error:
        raise _unreachable(error, f"{client.shown_url}{path}") from error
    return list(kept), tokens
