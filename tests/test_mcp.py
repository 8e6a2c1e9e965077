"""`sluicegate mcp`: a stdio MCP server over the HTTP API. Driven here by the `mcp` package's own client
(stdio_client + ClientSession) against a real stack on a real Valkey: every tool is listed and called,
and its effect is checked through the HTTP API, not through the tool's own answer."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from sluicegate.embedded import free_port
from sluicegate.sessions import keys
from tests.client_helpers import html_page, serving
from tests.helpers import ROOT, Stack, call, fast_settings, submit, wait_for

pytest.importorskip("mcp", reason="the mcp extra is not installed (pip install -e '.[mcp]'; ./dev installs it)")

from mcp import ClientSession  # noqa: E402
from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: E402

TOOLS = {"stats", "set_weight", "set_quota", "inspect_session", "cancel_request"}


@pytest.fixture
def slow_stack(redis_url: str) -> Iterator[Stack]:
    """API + scheduler + one worker slow enough (100 tokens/s) for a request to be caught running."""
    running = Stack(fast_settings(redis_url, sim_tokens_per_second=100.0)).start(workers=1)
    yield running
    running.stop()


class Tools:
    """The MCP server as a subprocess (`python -m sluicegate mcp --url ...`) and a session with it."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session

    async def call(self, name: str, **arguments: Any) -> Any:
        result = await self.session.call_tool(name, arguments)
        assert not result.is_error, result.content
        return json.loads(result.content[0].text)

    async def refused(self, name: str, **arguments: Any) -> str:
        result = await self.session.call_tool(name, arguments)
        assert result.is_error, result.content
        return result.content[0].text


def run_with_tools(base_url: str, body: Any, *, env: dict[str, str] | None = None,
                   args: tuple[str, ...] = ()) -> None:
    async def main() -> None:
        params = StdioServerParameters(command=sys.executable, args=["-m", "sluicegate", "mcp", *args], cwd=ROOT,
                                       env={"SLUICEGATE_URL": base_url, **(env or {}),
                                            "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            await body(Tools(session))

    asyncio.run(asyncio.wait_for(main(), 45))


def test_every_tool_acts_through_the_http_api(slow_stack: Stack) -> None:
    base = slow_stack.base_url

    async def body(tools: Tools) -> None:
        listed = await tools.session.list_tools()
        assert {tool.name for tool in listed.tools} == TOOLS
        described = {tool.name: tool for tool in listed.tools}
        assert set(described["set_quota"].input_schema["properties"]) >= {"group", "requests_per_second", "remove"}

        # stats: what GET /v1/admin/stats says
        shown = await tools.call("stats")
        _, direct = call("GET", f"{base}/v1/admin/stats")
        assert set(shown) == set(direct)
        assert [w["worker_id"] for w in shown["workers"]] == [w["worker_id"] for w in direct["workers"]]
        assert (shown["queued"], shown["running"]) == (direct["queued"], direct["running"]) == (0, 0)

        # set_weight: seen in /v1/admin/tenants
        await tools.call("set_weight", tenant="acme", weight=3.0)
        _, tenants = call("GET", f"{base}/v1/admin/tenants")
        assert next(t for t in tenants["tenants"] if t["tenant"] == "acme")["weight"] == 3.0

        # set_quota: the fields given change, `remove` makes one unlimited again, the rest is kept
        await tools.call("set_quota", group="default", requests_per_second=50, burst=10, max_concurrency=3)
        quota = quota_of(base, "default")
        assert (quota["requests_per_second"], quota["burst"], quota["max_concurrency"]) == (50, 10, 3)
        shown_group = await tools.call("set_quota", group="default", remove=["burst"])
        quota = quota_of(base, "default")
        assert quota.get("burst") is None and quota["requests_per_second"] == 50 and quota["max_concurrency"] == 3
        assert (await tools.call("set_quota", group="default"))["quota"] == quota  # no field: shown as it is
        assert shown_group["quota"].get("burst") is None
        assert "not a quota field" in await tools.refused("set_quota", group="default", remove=["weight"])

        # inspect_session: events and statuses of a session with one request done and one running
        first = submit(base, "mcp-s", max_tokens=5, tenant="acme")
        wait_for(lambda: status_of(base, first) == "done", timeout=10, what="the first request to end")
        rid = submit(base, "mcp-s", max_tokens=2000, tenant="acme")  # 20 s at 100 tokens/s: cancelled long before
        wait_for(lambda: status_of(base, rid) == "running", timeout=10, what="the request to run")
        seen = await tools.call("inspect_session", session_id="mcp-s")
        assert [r["request_id"] for r in seen["requests"]] == [rid, first]
        assert [r["status"] for r in seen["requests"]] == ["running", "done"]
        names = [(e["event"], e["data"].get("request_id")) for e in seen["events"]]
        assert ("queued", first) in names and ("done", first) in names and ("started", rid) in names
        assert seen["tokens_seen"][first] == 5 and seen["tokens_seen"][rid] > 0
        assert "token" not in {e["event"] for e in seen["events"]}
        ids = [e["id"] for e in seen["events"]]
        assert ids == sorted(ids)
        assert len((await tools.call("inspect_session", session_id="mcp-s", max_events=2))["events"]) == 2
        assert "404" in await tools.refused("inspect_session", session_id="no-such-session")

        # cancel_request: the request shows status cancelled
        answer = await tools.call("cancel_request", request_id=rid)
        assert answer["request_id"] == rid
        wait_for(lambda: status_of(base, rid) == "cancelled", timeout=10, what="the request to be cancelled")
        after = await tools.call("inspect_session", session_id="mcp-s")
        assert after["requests"][0]["status"] == "cancelled"
        assert ("cancelled", rid) in [(e["event"], e["data"].get("request_id")) for e in after["events"]]
        assert "404" in await tools.refused("cancel_request", request_id=rid[:2] + "nosuchrequest")

    run_with_tools(base, body)


def test_inspect_session_shows_an_expired_request_and_goes_on(slow_stack: Stack, r: Any) -> None:
    """A request's record expires a TTL after it ends while the session's log lives on with later
    requests: that request is `expired` in the answer, not an error of the whole tool."""
    base = slow_stack.base_url
    first = submit(base, "mcp-gone", max_tokens=3)
    wait_for(lambda: status_of(base, first) == "done", timeout=10, what="the first request to end")
    second = submit(base, "mcp-gone", max_tokens=3)
    wait_for(lambda: status_of(base, second) == "done", timeout=10, what="the second request to end")
    r.delete(keys.request(first), keys.request_input(first))  # what its TTL does, without waiting for it
    assert call("GET", f"{base}/v1/requests/{first}")[0] == 404

    async def body(tools: Tools) -> None:
        seen = await tools.call("inspect_session", session_id="mcp-gone")
        assert seen["requests"][0]["request_id"] == second and seen["requests"][0]["status"] == "done"
        assert seen["requests"][1] == {"request_id": first, "status": "expired"}
        assert ("done", first) in [(e["event"], e["data"].get("request_id")) for e in seen["events"]]

    run_with_tools(base, body)


def test_the_api_key_comes_from_the_environment_or_the_flag(redis_url: str) -> None:
    """With auth on, the admin tools need the admin key: SLUICEGATE_API_KEY gives it, and --api-key wins
    over it (a wrong key there is refused, 401, and changes nothing)."""
    running = Stack(fast_settings(redis_url, auth=True, admin_key="mcp-admin-key")).start(workers=0)
    try:
        async def allowed(tools: Tools) -> None:
            await tools.call("set_weight", tenant="acme", weight=2.0)

        async def refused(tools: Tools) -> None:
            assert "401" in await tools.refused("set_weight", tenant="acme", weight=4.0)
            assert "401" in await tools.refused("stats")

        run_with_tools(running.base_url, allowed, env={"SLUICEGATE_API_KEY": "mcp-admin-key"})
        assert tenant_weight(running.base_url, "acme") == 2.0
        run_with_tools(running.base_url, refused, env={"SLUICEGATE_API_KEY": "mcp-admin-key"},
                       args=("--api-key", "wrong-key"))
        assert tenant_weight(running.base_url, "acme") == 2.0
    finally:
        running.stop()


def test_unreachable_api_is_a_tool_error_not_a_crash() -> None:
    async def body(tools: Tools) -> None:
        assert "unreachable" in await tools.refused("stats")
        assert "unreachable" in await tools.refused("inspect_session", session_id="s")

    run_with_tools(f"http://127.0.0.1:{free_port()}", body)


def test_inspect_session_of_an_api_that_never_answers_is_a_tool_error_not_a_hang() -> None:
    """The connection is taken (the listen backlog completes it, as for an API stopped with SIGSTOP or behind a
    hung proxy) and no answer ever comes: the tool gives up within its read budget with `no_answer`, the error
    the other tools give after their timeout, instead of a call that never returns."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as silent:  # listens, never accepts, never answers
        async def body(tools: Tools) -> None:
            refusal = await asyncio.wait_for(tools.refused("inspect_session", session_id="s"), 20)
            assert "no_answer" in refusal, refusal

        run_with_tools(f"http://127.0.0.1:{silent.getsockname()[1]}", body)


def test_inspect_session_of_a_page_that_is_no_event_stream_says_so() -> None:
    """An answer came: `not_an_event_stream`, not `no_answer` (which says a call may have taken effect unseen)."""
    async def body(tools: Tools) -> None:
        refusal = await tools.refused("inspect_session", session_id="s")
        assert "not_an_event_stream" in refusal and "no_answer" not in refusal, refusal

    with serving(html_page(200, b"<html><body><h1>Welcome</h1></body></html>")) as url:  # a page, no event stream
        run_with_tools(url, body)


def quota_of(base: str, group: str) -> dict[str, Any]:
    code, groups = call("GET", f"{base}/v1/admin/groups")
    assert code == 200, groups
    return next(g for g in groups["groups"] if g["group"] == group)["quota"]


def status_of(base: str, rid: str) -> str:
    return call("GET", f"{base}/v1/requests/{rid}")[1]["status"]


def tenant_weight(base: str, tenant: str) -> float:
    _, tenants = call("GET", f"{base}/v1/admin/tenants", headers={"authorization": "Bearer mcp-admin-key"})
    return next(t for t in tenants["tenants"] if t["tenant"] == tenant)["weight"]
