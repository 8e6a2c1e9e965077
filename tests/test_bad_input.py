"""Bad input gets a clear 4xx JSON error naming the problem, never a 5xx, never half-written state."""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from sluicegate.embedded import EmbeddedServer, free_port
from sluicegate.sessions import keys
from sluicegate.workers.engines.sim import sim_text
from tests.helpers import Stack, call, fast_settings, sse, submit, wait_for

SUBMIT = "/v1/sessions/{sid}/requests"


def assert_error(code: int, body: Any, status: int | tuple[int, ...], *words: str, what: str = "") -> None:
    """A JSON error body {"error": {"type", "message"}} with the expected status, naming the problem."""
    statuses = (status,) if isinstance(status, int) else status
    assert code < 500, f"{what}: a 5xx for bad input: {code} {body}"
    assert code in statuses, f"{what}: expected {statuses}, got {code} {body}"
    assert isinstance(body, dict) and set(body) == {"error"}, f"{what}: not a JSON error body: {body!r}"
    error = body["error"]
    assert isinstance(error.get("type"), str) and error["type"], f"{what}: no error type: {body}"
    assert isinstance(error.get("message"), str) and error["message"], f"{what}: no message: {body}"
    for word in words:
        assert word.lower() in error["message"].lower(), f"{what}: message does not name {word!r}: {error}"


BAD_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("max_tokens -1", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("max_tokens 0", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("max_tokens huge", {"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ("max_tokens enormous", {"prompt": "x", "max_tokens": 10**30}, "max_tokens"),
    ("max_tokens text", {"prompt": "x", "max_tokens": "x"}, "max_tokens"),
    ("max_tokens fraction", {"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ("max_tokens null", {"prompt": "x", "max_tokens": None}, "max_tokens"),
    ("priority 10", {"prompt": "x", "priority": 10}, "priority"),
    ("priority -1", {"prompt": "x", "priority": -1}, "priority"),
    ("priority name", {"prompt": "x", "priority": "urgent"}, "priority"),
    ("priority bool", {"prompt": "x", "priority": True}, "priority"),
    ("priority fraction", {"prompt": "x", "priority": 5.5}, "priority"),
    ("priority null", {"prompt": "x", "priority": None}, "priority"),
    ("both inputs", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "prompt"),
    ("no input", {"max_tokens": 5}, "prompt"),
    ("prompt not text", {"prompt": 123}, "prompt"),
    ("messages empty", {"messages": []}, "messages"),
    ("messages not a list", {"messages": "hi"}, "messages"),
    ("message without role", {"messages": [{"content": "hi"}]}, "role"),
    ("unknown field", {"prompt": "x", "temperature_typo": 1}, "temperature_typo"),
    ("tenant with space", {"prompt": "x", "tenant": "has space"}, "tenant"),
    ("tenant empty", {"prompt": "x", "tenant": ""}, "tenant"),
    ("tenant too long", {"prompt": "x", "tenant": "t" * 65}, "tenant"),
    ("tenant slash", {"prompt": "x", "tenant": "a/b"}, "tenant"),
    ("tenant not text", {"prompt": "x", "tenant": 5}, "tenant"),
    ("group with space", {"prompt": "x", "group": "gpu pool"}, "group"),
    ("group pipe", {"prompt": "x", "group": "a|b"}, "group"),
    ("params not an object", {"prompt": "x", "params": "fast"}, "params"),
]


def test_invalid_fields_are_422_naming_them(stack: Stack, r: redis.Redis) -> None:
    failures = []
    for what, body, names in BAD_FIELDS:
        code, reply = call("POST", stack.base_url + SUBMIT.format(sid="bad-fields"), body)
        try:
            assert_error(code, reply, 422, names, what=what)
        except AssertionError as error:
            failures.append(str(error).splitlines()[0])
    assert not failures, "\n".join(failures)
    assert r.keys("sg:{s:*}:r:*") == [] and r.keys("sg:{s:*}:s:*") == [], "a rejected submit left state behind"


def test_malformed_bodies_and_ids(stack: Stack, r: redis.Redis) -> None:
    base = stack.base_url
    url = base + SUBMIT.format(sid="bad-bodies")
    cases: list[tuple[str, tuple[int, Any], int | tuple[int, ...], tuple[str, ...]]] = [
        ("malformed JSON", call("POST", url, raw=b'{"prompt": "x", '), 422, ("json",)),
        ("empty body", call("POST", url, raw=b""), 422, ()),
        ("JSON array", call("POST", url, raw=b"[]"), 422, ()),
        ("JSON string", call("POST", url, raw=b'"hello"'), 422, ()),
        ("JSON null", call("POST", url, raw=b"null"), 422, ()),
        ("not UTF-8", call("POST", url, raw=b'{"prompt": "\xff\xfe"}'), (400, 422), ()),
        ("text/plain", call("POST", url, raw=b'{"prompt": "x"}', headers={"content-type": "text/plain"}),
         (415, 422), ()),
        ("form body", call("POST", url, raw=b"prompt=x", headers={"content-type": "application/x-www-form-urlencoded"}),
         (415, 422), ()),
        ("session id chars", call("POST", base + SUBMIT.format(sid="bad$id"), {"prompt": "x"}), 422, ("session",)),
        ("session id space", call("POST", base + SUBMIT.format(sid="has%20space"), {"prompt": "x"}), 422, ("session",)),
        ("session id unicode", call("POST", base + SUBMIT.format(sid="caf%C3%A9"), {"prompt": "x"}), 422, ("session",)),
        ("session id pipe", call("POST", base + SUBMIT.format(sid="a%7Cb"), {"prompt": "x"}), 422, ("session",)),
        ("session id too long", call("POST", base + SUBMIT.format(sid="s" * 129), {"prompt": "x"}), 422,
         ("session",)),
        ("session events bad id", call("GET", f"{base}/v1/sessions/bad$id/events"), 422, ("session",)),
    ]
    for what, (code, reply), status, words in cases:
        assert_error(code, reply, status, *words, what=what)
    assert r.keys("sg:{s:*}:r:*") == [] and r.keys("sg:{s:*}:s:*") == [], "a rejected submit left state behind"


def test_chat_completions_bad_input(stack: Stack, r: redis.Redis) -> None:
    url = f"{stack.base_url}/v1/chat/completions"
    ok = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    for what, body, headers, words in [
        ("no messages", {"model": "m"}, {}, ("messages",)),
        ("max_tokens 0", {**ok, "max_tokens": 0}, {}, ("max_tokens",)),
        ("priority header", ok, {"X-Priority": "urgent"}, ("x-priority",)),
        ("session header", ok, {"X-Session-Id": "bad$id"}, ("session",)),
        ("tenant header", ok, {"X-Tenant": "has space"}, ("x-tenant",)),
        ("group header", ok, {"X-Group": "a|b"}, ("x-group",)),
    ]:
        code, reply = call("POST", url, body, headers=headers)
        assert_error(code, reply, 422, *words, what=f"chat: {what}")
    for what, raw, words in [  # the route validates its body itself: the same 422s as FastAPI's
        ("malformed JSON", b'{"messages": [', ("json",)),
        ("empty body", b"", ()),
        ("JSON array", b"[]", ()),
        ("messages not a list", b'{"messages": "hi"}', ("messages",)),
        ("role missing", b'{"messages": [{"content": "hi"}]}', ("role",)),
        ("lone surrogate", b'{"messages": [{"role": "user", "content": "a\\udfffb"}]}', ()),
    ]:
        code, reply = call("POST", url, raw=raw)
        assert_error(code, reply, 422, *words, what=f"chat: {what}")
    assert r.keys("sg:{s:*}:r:*") == [] and r.keys("sg:{s:*}:s:*") == []


def test_unknown_things_are_404_json(stack: Stack) -> None:
    base = stack.base_url
    for what, method, path in [
        ("unknown session", "GET", "/v1/sessions/nosuch/events"),
        ("unknown request", "GET", "/v1/requests/nosuch"),
        ("cancel unknown request", "DELETE", "/v1/requests/nosuch"),
        ("events of unknown request", "GET", "/v1/requests/nosuch/events"),
        ("unknown route", "GET", "/v1/nothing-here"),
        ("unknown root route", "POST", "/submit"),
        ("unknown admin route", "GET", "/v1/admin/nothing"),
    ]:
        code, reply = call(method, base + path)
        assert_error(code, reply, 404, what=what)
    code, reply = call("PUT", f"{base}/v1/requests/nosuch", {})
    assert_error(code, reply, 405, what="wrong method")
    _, reply = call("GET", f"{base}/v1/sessions/nosuch/events")
    assert "nosuch" in reply["error"]["message"]


def head_or(base: str, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def methods(allow: str) -> set[str]:
    return {m.strip() for m in allow.split(",")}


def test_a_405_names_the_allowed_methods_and_probes_answer_head(stack: Stack) -> None:
    # RFC 9110: a 405 carries Allow; a load balancer's HEAD check gets the GET's status and headers, no body
    from tests.test_hot_path import fastapi_path

    with fastapi_path(stack) as other:
        for base in (stack.base_url, other):
            # Allow names every method of the path, whichever of its routes Starlette's router met first
            for method, path, allowed in (("DELETE", "/v1/chat/completions", "POST"),
                                          ("PUT", "/v1/requests/x", "GET, DELETE"),
                                          ("PATCH", "/v1/requests/x", "GET, DELETE"),
                                          ("PUT", "/v1/admin/keys", "GET, POST"),
                                          ("HEAD", "/v1/requests/x/events", "GET"),
                                          ("POST", "/healthz", "GET, HEAD")):  # /healthz has a HEAD route of its own
                code, headers, body = head_or(base, method, path)
                assert code == 405, (base, method, path, code)
                assert headers.get("allow") and methods(headers["allow"]) == methods(allowed), (base, path, headers)
                if method != "HEAD":
                    assert json.loads(body)["error"]["type"] == "method_not_allowed"
            for path in ("/healthz", "/readyz"):
                code, headers, body = head_or(base, "HEAD", path)
                got, got_headers, got_body = head_or(base, "GET", path)
                assert (code, body) == (got, b"") and got == 200, (base, path, code, got)
                assert headers["content-type"] == got_headers["content-type"] == "application/json"
                assert int(headers["content-length"]) > 0


def test_bad_cursor_and_finished_cancel(stack: Stack) -> None:
    base = stack.base_url
    rid = submit(base, "cursor", max_tokens=3)
    wait_for(lambda: call("GET", f"{base}/v1/requests/{rid}")[1]["status"] == "done", what="the request")
    for path in ("/v1/sessions/cursor/events", f"/v1/requests/{rid}/events"):
        for bad in ("abc", "-1", "1.5", "1e3", "0x10", "\xb2", "9" * 5000, str(2**53), str(10**30)):
            code, reply = raw_get(base, path, {"Last-Event-ID": bad})
            assert_error(code, reply, 422, "last-event-id", what=f"Last-Event-ID {bad[:20]!r} on {path}")
        for bad in ("nope", "%C2%B2", "-5", str(10**30)):
            code, reply = call("GET", f"{base}{path}?after={bad}")
            assert_error(code, reply, 422, "after", what=f"?after={bad} on {path}")
    # a good cursor still works after all that
    assert [e.event for e in sse(base, f"/v1/requests/{rid}/events", last_id=2, timeout=10)][-1] == "done"
    code, reply = call("DELETE", f"{base}/v1/requests/{rid}")
    assert_error(code, reply, 409, "done", what="cancel of a finished request")
    assert call("GET", f"{base}/v1/requests/{rid}")[1]["status"] == "done"


def raw_get(base_url: str, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    host, port = base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest("GET", path)
        for name, value in headers.items():
            connection.putheader(name, value.encode("latin-1"))
        connection.endheaders()
        response = connection.getresponse()
        payload = response.read()
        return response.status, json.loads(payload) if payload else None
    finally:
        connection.close()


def test_bad_admin_input_is_422_and_changes_nothing(stack: Stack, r: redis.Redis) -> None:
    base = stack.base_url
    for body in ({"weight": 0}, {"weight": -1}, {"weight": "heavy"}, {}, {"weight": None}, {"weight": 1e9},
                 {"weight": 2, "extra": 1}):
        code, reply = call("PUT", f"{base}/v1/admin/tenants/acme", body)
        assert_error(code, reply, 422, what=f"tenant weight {body}")
    code, reply = call("PUT", f"{base}/v1/admin/tenants/bad%20name", {"weight": 2})
    assert_error(code, reply, 422, "tenant", what="tenant name")
    for body in ({"requests_per_second": -1}, {"requests_per_second": 0}, {"requests_per_second": "fast"},
                 {"tokens_per_second": -5}, {"burst": 0}, {"burst": 1.5}, {"max_concurrency": -1},
                 {"requests_per_second": 5, "typo": 1}):
        code, reply = call("PUT", f"{base}/v1/admin/groups/default", body)
        assert_error(code, reply, 422, what=f"group quota {body}")
    code, reply = call("PUT", f"{base}/v1/admin/groups/bad%20name", {"burst": 2})
    assert_error(code, reply, 422, "group", what="group name")
    code, reply = call("POST", f"{base}/v1/admin/keys", {"tenant": "has space"})
    assert_error(code, reply, 422, "tenant", what="key for a bad tenant name")
    assert r.hgetall("sg:tenants") == {}, "a rejected weight was stored"
    assert not r.exists("sg:{g:default}:cfg") and "bad name" not in r.smembers("sg:groups")
    assert call("GET", f"{base}/v1/admin/groups")[1]["groups"] == [{"group": "default", "model": None, "quota": {},
                                                                     "deadlines_ms": {}}]


@pytest.fixture
def small_body_stack(redis_url: str) -> Iterator[Stack]:
    running = Stack(fast_settings(redis_url, max_body_mb=0.01)).start(workers=0)
    yield running
    running.stop()


def post_chunked(base_url: str, path: str, chunks: list[bytes]) -> tuple[int, Any]:
    host, port = base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("POST", path, body=iter(chunks), encode_chunked=True,
                           headers={"content-type": "application/json", "transfer-encoding": "chunked"})
        response = connection.getresponse()
        payload = response.read()
        return response.status, json.loads(payload) if payload else None
    finally:
        connection.close()


def test_body_over_the_limit_is_413(small_body_stack: Stack, r: redis.Redis) -> None:
    base = small_body_stack.base_url
    limit = small_body_stack.settings.max_body_bytes
    big = json.dumps({"prompt": "x" * (limit + 100), "max_tokens": 5}).encode()
    code, reply = call("POST", base + SUBMIT.format(sid="big"), raw=big)
    assert_error(code, reply, 413, what="content-length over the limit")
    pieces = [big[i:i + 1000] for i in range(0, len(big), 1000)]
    code, reply = post_chunked(base, SUBMIT.format(sid="big"), pieces)
    assert_error(code, reply, 413, what="chunked body over the limit")
    chat = json.dumps({"messages": [{"role": "user", "content": "x" * (limit + 100)}]}).encode()
    code, reply = post_chunked(base, "/v1/chat/completions", [chat[i:i + 1000] for i in range(0, len(chat), 1000)])
    assert_error(code, reply, 413, what="chunked chat body over the limit")  # the route reads its own body
    code, reply = call("POST", f"{base}/v1/admin/tenants/acme", raw=b'{"weight": ' + b" " * limit + b"2}")
    assert code in (405, 413) and "error" in reply  # wrong method or too large: still JSON, still 4xx
    assert r.keys("sg:{s:*}:r:*") == [] and r.keys("sg:{s:*}:s:*") == []
    # just under the limit, by either transfer, is accepted
    fits = json.dumps({"prompt": "y" * (limit - 200), "max_tokens": 5}).encode()
    assert call("POST", base + SUBMIT.format(sid="fits"), raw=fits)[0] == 202
    code, reply = post_chunked(base, SUBMIT.format(sid="fits"), [fits[i:i + 1000] for i in range(0, len(fits), 1000)])
    assert code == 202, reply


@pytest.fixture
def idle_stack(redis_url: str) -> Iterator[Stack]:
    running = Stack(fast_settings(redis_url)).start(workers=0)
    yield running
    running.stop()


def test_large_prompt_is_stored_once(idle_stack: Stack, r: redis.Redis) -> None:
    base = idle_stack.base_url
    prompt = "".join(chr(97 + (i * 7919) % 26) for i in range(4 * 1024 * 1024))
    code, reply = call("POST", base + SUBMIT.format(sid="huge"), {"prompt": prompt, "max_tokens": 6})
    assert code == 202, reply
    rid = reply["request_id"]
    holders = {key: r.memory_usage(key) or 0 for key in r.scan_iter(match="*", count=1000)}
    big = {key: size for key, size in holders.items() if size > 64 * 1024}
    assert len(big) == 1 and next(iter(big.values())) >= len(prompt), f"the prompt is not stored exactly once: {big}"
    assert sum(holders.values()) - next(iter(big.values())) < 256 * 1024, "something else grew with the prompt"
    view = call("GET", f"{base}/v1/requests/{rid}")[1]
    assert len(json.dumps(view)) < 4096, "the status view carries the prompt"

    idle_stack.add_worker()
    events = list(sse(base, f"/v1/requests/{rid}/events", timeout=30))
    assert events[-1].event == "done"
    assert all(len(json.dumps(e.data)) < 1024 for e in events), "an event carries the prompt"
    assert max(len(entry) for entry in r.lrange(keys.session_log("huge"), 0, -1)) < 1024
    # and the worker did see the whole prompt: the sim text is a function of all of it
    assert "".join(e.data["text"] for e in events if e.event == "token") == sim_text(prompt, 6)


def test_lone_surrogate_is_422_not_500(stack: Stack, r: redis.Redis) -> None:
    """JSON allows "\\ud800", UTF-8 does not: the API must refuse it as bad input, not fail storing it."""
    for body in (b'{"prompt": "\\ud800", "max_tokens": 2}',
                 b'{"messages": [{"role": "user", "content": "a\\udfffb"}], "max_tokens": 2}'):
        code, reply = call("POST", f"{stack.base_url}/v1/sessions/sur/requests", raw=body)
        assert code == 422 and "Unicode" in reply["error"]["message"], (code, reply)
    assert not r.keys("sg:{s:*}:r:*") and not r.keys(keys.session_prefix("sur") + "s:sur:*")


def test_a_chat_client_that_leaves_while_sending_its_body_is_a_4xx_not_a_server_error() -> None:
    """The chat route reads its own body: a client gone mid-body (or cut off by the size limit) is an
    ApiError answered like any bad request, not an exception left to the server."""
    from starlette.requests import Request

    from sluicegate.api.errors import ApiError
    from sluicegate.api.openai_routes import chat_body

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    request = Request({"type": "http", "method": "POST", "path": "/v1/chat/completions",
                       "headers": [(b"content-type", b"application/json")]}, receive)
    with pytest.raises(ApiError) as raised:
        asyncio.run(chat_body(request))
    assert raised.value.status == 400


@pytest.mark.own_servers
def test_redis_unavailable_is_503_on_every_route(tmp_path: Path) -> None:
    """Redis gone from behind a running API: a clear 503 JSON error, through the chat route's own
    fast path as through FastAPI's handlers."""
    server = EmbeddedServer(data_dir=str(tmp_path), port=free_port(), persistent=False).start()
    stack = Stack(fast_settings(server.url)).start(scheduler=False, workers=0)
    try:
        server.stop()
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for url, body in [(f"{stack.base_url}/v1/chat/completions", chat),
                          (stack.base_url + SUBMIT.format(sid="nobody"), {"prompt": "hi"})]:
            code, reply = call("POST", url, body)
            assert code == 503 and "Redis" in reply["error"]["message"], (url, code, reply)
    finally:
        stack.stop()
        server.stop()


def test_names_with_a_trailing_newline_and_request_ids_naming_other_keys_are_refused(stack: Stack,
                                                                                      r: redis.Redis) -> None:
    """Found by reading (issue 12): `$` also matches before a final newline, so `abc\\n` passed the name
    checks; and a request id with a key's suffix (`<rid>:in`, its stored prompt) must name nothing."""
    base = stack.base_url
    code, reply = call("PUT", f"{base}/v1/admin/tenants/abc%0A", {"weight": 2.0})
    assert_error(code, reply, 422, what="a tenant name ending in a newline")
    code, reply = call("PUT", f"{base}/v1/admin/groups/abc%0A", {"burst": 2})
    assert_error(code, reply, 422, what="a group name ending in a newline")
    code, reply = call("POST", f"{base}/v1/sessions/abc%0A/requests", {"prompt": "x"})
    assert_error(code, reply, 422, what="a session id ending in a newline")
    assert not any("abc\n" in key for key in r.hkeys(keys.TENANT_WEIGHTS)) and "abc\n" not in r.smembers(keys.GROUPS)
    rid = submit(base, "k", max_tokens=2)
    for suffix in (":in", "%0A"):
        code, reply = call("GET", f"{base}/v1/requests/{rid}{suffix}")
        assert_error(code, reply, 404, what=f"a request id with {suffix!r} after it")
