"""Models and groups: the registry (sg:models), `PUT/GET /v1/admin/groups` with `model`, `GET /v1/models`,
chat routing by `model`, `unknown_group` for a group neither declared nor served, a worker's
`--backend-model`, and chat message validation. Real Valkey (one server or a 3-master cluster)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any, TypeVar

import openai
import pytest
import redis

from sluicegate.api.directory import Directory
from sluicegate.scheduler.deadlines import write_deadlines
from sluicegate.sessions import keys
from sluicegate.sessions.registry import (
    ModelConflict,
    declare_group,
    forget_group_model,
    group_exists,
    group_models,
    group_of_model,
)
from tests.helpers import Stack, call, fast_settings, submit, wait_for, with_redis

T = TypeVar("T")
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
QWEN = "qwen2.5:7b"
USER = [{"role": "user", "content": "hi"}]


def nothing_stored(r: redis.Redis, group: str) -> None:
    assert r.keys("sg:{s:*}:r:*") == [] and r.keys("sg:{s:*}:s:*") == [], "a refused submit left a request"
    assert group not in r.smembers(keys.GROUPS) and r.keys(keys.group_prefix(group) + "*") == []


def sdk(stack: Stack, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


@pytest.fixture
def empty_stack(redis_url: str) -> Iterator[Stack]:
    """API and scheduler, no worker."""
    running = Stack(fast_settings(redis_url)).start(workers=0)
    yield running
    running.stop()


# ---- the registry --------------------------------------------------------------------------------
def test_declare_group_maps_one_model_per_group_and_refuses_a_taken_model(redis_url: str, r: redis.Redis) -> None:
    async def scenario(client: Any) -> None:
        assert await group_exists(client, "default") and not await group_exists(client, "a")
        await declare_group(client, "a", LLAMA)
        assert await group_models(client) == {"a": LLAMA} and await group_of_model(client, LLAMA) == "a"
        assert await group_exists(client, "a")
        with pytest.raises(ModelConflict) as conflict:
            await declare_group(client, "b", LLAMA)
        assert conflict.value.group == "a" and "'a'" in str(conflict.value) and isinstance(conflict.value, ValueError)
        assert not await group_exists(client, "b"), "a refused declaration registered its group"
        await declare_group(client, "a")  # no model: the group keeps its own
        await declare_group(client, "a", LLAMA)  # the same again: nothing changes
        assert await group_models(client) == {"a": LLAMA}
        await declare_group(client, "a", QWEN)  # another model replaces the group's old one
        assert await group_models(client) == {"a": QWEN} and await group_of_model(client, LLAMA) is None
        await declare_group(client, "b", LLAMA)  # free again
        assert await group_models(client) == {"a": QWEN, "b": LLAMA}
        await forget_group_model(client, "a")
        assert await group_models(client) == {"b": LLAMA} and await group_exists(client, "a")
        for bad in ("", "has space", "tab\there", "nul\x00", "x" * 257, "line\n"):
            with pytest.raises(ValueError):
                await declare_group(client, "c", bad)
        assert not await group_exists(client, "c")
        await declare_group(client, "c", "m" * 256)

    with_redis(redis_url, scenario)
    assert r.hgetall(keys.MODELS) == {LLAMA: "b", "m" * 256: "c"}
    assert {"a", "b", "c"} <= r.smembers(keys.GROUPS)


def test_concurrent_declarations_of_one_model_have_one_winner(redis_url: str, r: redis.Redis) -> None:
    async def scenario(client: Any) -> list[BaseException | None]:
        return await asyncio.gather(*(declare_group(client, f"g{i}", LLAMA) for i in range(8)),
                                    return_exceptions=True)

    outcomes = with_redis(redis_url, scenario)
    assert sum(o == LLAMA for o in outcomes) == 1
    assert all(isinstance(o, ModelConflict) for o in outcomes if o != LLAMA)
    winner = f"g{outcomes.index(LLAMA)}"
    assert r.hgetall(keys.MODELS) == {LLAMA: winner}
    assert {o.group for o in outcomes if isinstance(o, ModelConflict)} == {winner}


def test_the_directory_caches_and_sees_a_new_model_within_its_miss_ttl(redis_url: str) -> None:
    now = [100.0]

    async def scenario(client: Any) -> None:
        directory = Directory(client, ttl=5.0, miss_ttl=1.0, clock=lambda: now[0])
        loads = 0
        real = directory._fresh

        async def counted(max_age: float) -> None:
            nonlocal loads
            before = directory.loaded_at
            await real(max_age)
            loads += directory.loaded_at != before

        directory._fresh = counted  # type: ignore[method-assign]
        await declare_group(client, "a", LLAMA)
        assert await directory.group_for(LLAMA) == "a" and await directory.group_for("a") == "a"
        assert await directory.group_for("default") == "default"
        assert loads == 1, "known names within the TTL cost one load"
        await declare_group(client, "b", QWEN)  # as another API process would: no invalidate here
        assert await directory.group_for(QWEN) is None and loads == 1  # a miss within miss_ttl: no reload
        now[0] += 1.01
        assert await directory.group_for(QWEN) == "b" and loads == 2  # a miss after it: reloaded
        assert await directory.group_for("nope") is None and loads == 2
        await declare_group(client, "a", "renamed")
        now[0] += 5.01
        assert await directory.group_for("renamed") == "a" and loads == 3  # the TTL lapsed: reloaded
        assert await directory.group_for(LLAMA) is None
        await declare_group(client, "c", "third")
        directory.invalidate()
        assert await directory.group_for("third") == "c" and loads == 4

    with_redis(redis_url, scenario)


def test_the_directory_remembers_deadlines_of_known_groups_only(redis_url: str) -> None:
    """Every submit that names no deadline asks for its group's default: one naming a made-up group
    (a 404 at the submit) must leave nothing behind, however many names a caller invents."""
    now = [100.0]

    async def scenario(client: Any) -> None:
        directory = Directory(client, ttl=5.0, miss_ttl=1.0, clock=lambda: now[0])
        await declare_group(client, "a", LLAMA)
        await write_deadlines(client, "a", {5: 250})
        assert await directory.deadline_for("a", 5) == 250 and await directory.deadline_for("a", 3) is None
        for i in range(200):
            assert await directory.deadline_for(f"made-up-{i}", 5) is None
        assert set(directory.deadlines) == {"a"}
        await declare_group(client, "b", QWEN)  # declared by another process: known after miss_ttl
        await write_deadlines(client, "b", {5: 40})
        now[0] += 1.01
        assert await directory.deadline_for("b", 5) == 40 and set(directory.deadlines) == {"a", "b"}

    with_redis(redis_url, scenario)


# ---- the admin API -------------------------------------------------------------------------------
def test_admin_groups_declare_models_with_the_quota_as_before(empty_stack: Stack, r: redis.Redis) -> None:
    base = empty_stack.base_url
    code, body = call("PUT", f"{base}/v1/admin/groups/llama", {"model": LLAMA, "requests_per_second": 5, "burst": 2})
    assert code == 200 and body == {"group": "llama", "model": LLAMA, "quota": {"requests_per_second": 5, "burst": 2},
                                    "deadlines_ms": {}}
    code, body = call("PUT", f"{base}/v1/admin/groups/llama", {"requests_per_second": None})  # model kept
    assert code == 200 and body == {"group": "llama", "model": LLAMA, "quota": {"burst": 2}, "deadlines_ms": {}}
    code, body = call("PUT", f"{base}/v1/admin/groups/qwen", {"model": QWEN})
    assert code == 200 and body == {"group": "qwen", "model": QWEN, "quota": {}, "deadlines_ms": {}}
    code, body = call("GET", f"{base}/v1/admin/groups")
    assert code == 200 and body["groups"] == [
        {"group": "llama", "model": LLAMA, "quota": {"burst": 2}, "deadlines_ms": {}},
        {"group": "qwen", "model": QWEN, "quota": {}, "deadlines_ms": {}}]

    # a model another group serves: 409, and nothing changes (not the quota, not the group list)
    code, body = call("PUT", f"{base}/v1/admin/groups/other", {"model": LLAMA, "burst": 9})
    assert code == 409 and body["error"]["type"] == "model_conflict" and "'llama'" in body["error"]["message"]
    code, body = call("PUT", f"{base}/v1/admin/groups/qwen", {"model": LLAMA, "burst": 9})
    assert code == 409 and body["error"]["type"] == "model_conflict"
    assert r.hgetall(keys.MODELS) == {LLAMA: "llama", QWEN: "qwen"}
    assert "other" not in r.smembers(keys.GROUPS) and not r.exists(keys.group_key("qwen", "cfg"))

    # another model replaces the group's; null forgets it
    assert call("PUT", f"{base}/v1/admin/groups/qwen", {"model": "qwen3:8b"})[1]["model"] == "qwen3:8b"
    code, body = call("PUT", f"{base}/v1/admin/groups/llama", {"model": None})
    assert code == 200 and body == {"group": "llama", "model": None, "quota": {"burst": 2}, "deadlines_ms": {}}
    assert r.hgetall(keys.MODELS) == {"qwen3:8b": "qwen"}
    listed = call("GET", f"{base}/v1/admin/groups")[1]["groups"]
    assert {"group": "llama", "model": None, "quota": {"burst": 2}, "deadlines_ms": {}} in listed

    for bad in ("", "has space", "tab\t", "x" * 257, 5):
        code, body = call("PUT", f"{base}/v1/admin/groups/llama", {"model": bad})
        assert code == 422 and "model" in body["error"]["message"], (bad, body)
    assert r.hgetall(keys.MODELS) == {"qwen3:8b": "qwen"}


def test_a_group_name_left_behind_does_not_block_a_model_of_that_name(empty_stack: Stack, r: redis.Redis) -> None:
    """`sg:groups` only grows: a group once routed to by name (`--group llama`) stays for good. Another
    group may still take that name as its model (no group can be deleted, so refusing it would block the
    name for ever); the chat route then goes to the model's group, and /v1/models leaves the old name out."""
    base = empty_stack.base_url
    assert call("PUT", f"{base}/v1/admin/groups/llama", {})[0] == 200  # the group by name, no model
    code, body = call("PUT", f"{base}/v1/admin/groups/gpu", {"model": "llama"})
    assert code == 200 and body["model"] == "llama", body
    assert r.hgetall(keys.MODELS) == {"llama": "gpu"}
    code, body = call("PUT", f"{base}/v1/admin/groups/other", {"model": "llama"})  # served: still refused
    assert code == 409 and body["error"]["type"] == "model_conflict"


# ---- GET /v1/models ------------------------------------------------------------------------------
def test_models_lists_the_groups_with_live_workers(empty_stack: Stack) -> None:
    stack = empty_stack
    client = sdk(stack)
    assert client.models.list().data == []
    stack.add_worker()  # group default, no model: listed under its name
    stack.add_worker(group="big", backend_model=f"big={LLAMA}")  # declares its model
    stack.add_worker(group="small", backend_model="default=ignored")  # a model for another group only
    call("PUT", f"{stack.base_url}/v1/admin/groups/idle", {"model": QWEN})  # declared, no worker: not listed
    code, body = call("GET", f"{stack.base_url}/v1/models")
    assert code == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["default", LLAMA, "small"]
    assert all(m["object"] == "model" and m["owned_by"] == "sluicegate" and isinstance(m["created"], int)
               and m["created"] > 1_700_000_000 for m in body["data"])
    listed = client.models.list()
    assert [m.id for m in listed.data] == ["default", LLAMA, "small"] and listed.data[0].owned_by == "sluicegate"
    assert client.models.retrieve(LLAMA).id == LLAMA
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve(QWEN)
    assert missing.value.code == "model_not_found"

    big = next(w for w, worker in stack.workers.items() if worker.settings.group == "big")
    stack.stop_service(big)  # its worker gone: the group's model is no longer listed (a listing lasts 1 s)
    wait_for(lambda: [m.id for m in client.models.list().data] == ["default", "small"], what="big to go")


def test_models_does_not_list_a_group_name_that_routes_to_another_group(empty_stack: Stack, r: redis.Redis) -> None:
    """Data written before such a model was refused: `a` serves the model `b`, and the group `b`, which
    names no model, has a live worker. A chat call naming `b` goes to `a`, so `b` is listed only while
    `a` has a live worker."""
    stack = empty_stack
    stack.add_worker(group="b")
    r.hset(keys.MODELS, "b", "a")
    r.sadd(keys.GROUPS, "a")
    client = sdk(stack)
    wait_for(lambda: [m.id for m in client.models.list().data] == [], what="b not listed (a listing lasts 1 s)")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("b")
    stack.add_worker(group="a")
    wait_for(lambda: [m.id for m in client.models.list().data] == ["b"], what="b listed, for a")


def test_models_needs_a_key_when_auth_is_on(redis_url: str) -> None:
    stack = Stack(fast_settings(redis_url, auth=True, admin_key="admin-secret")).start(workers=1)
    try:
        assert call("GET", f"{stack.base_url}/v1/models")[0] == 401
        with pytest.raises(openai.AuthenticationError):
            sdk(stack, api_key="wrong").models.list()
        code, created = call("POST", f"{stack.base_url}/v1/admin/keys", {"tenant": "acme"},
                             headers={"Authorization": "Bearer admin-secret"})
        assert code == 201
        assert [m.id for m in sdk(stack, api_key=created["key"]).models.list().data] == ["default"]
    finally:
        stack.stop()


# ---- chat routing --------------------------------------------------------------------------------
def request_group(stack: Stack, completion_id: str) -> str:
    code, status = call("GET", f"{stack.base_url}/v1/requests/{completion_id.removeprefix('chatcmpl-')}")
    assert code == 200
    return str(status["group"])


def test_chat_routes_by_model(stack: Stack, r: redis.Redis) -> None:
    stack.add_worker(group="big", backend_model=f"big={LLAMA}")
    client = sdk(stack)
    reply = client.chat.completions.create(model=LLAMA, messages=USER, max_tokens=3)  # type: ignore[arg-type]
    assert request_group(stack, reply.id) == "big" and reply.model == LLAMA and reply.choices[0].message.content
    reply = client.chat.completions.create(model="big", messages=USER, max_tokens=3)  # type: ignore[arg-type]
    assert request_group(stack, reply.id) == "big"  # a group's name works as a model
    reply = client.chat.completions.create(model="default", messages=USER, max_tokens=3)  # type: ignore[arg-type]
    assert request_group(stack, reply.id) == "default"
    code, body = call("POST", f"{stack.base_url}/v1/chat/completions", {"messages": USER, "max_tokens": 2})
    assert code == 200 and request_group(stack, body["id"]) == "default"  # no model: default
    stream = client.chat.completions.create(model=LLAMA, messages=USER, max_tokens=3, stream=True)  # type: ignore
    chunks = list(stream)
    assert chunks and request_group(stack, chunks[0].id) == "big"

    # X-Group wins over the model
    reply = client.chat.completions.create(model=LLAMA, messages=USER, max_tokens=2,  # type: ignore[arg-type]
                                           extra_headers={"X-Group": "default"})
    assert request_group(stack, reply.id) == "default"
    reply = client.chat.completions.create(model="no-such-model", messages=USER, max_tokens=2,  # type: ignore
                                           extra_headers={"X-Group": "big"})
    assert request_group(stack, reply.id) == "big"

    stored = r.keys("sg:{s:*}:r:*")
    for stream_it in (False, True):
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="no-such-model", messages=USER, max_tokens=2,  # type: ignore
                                           stream=stream_it)
        assert missing.value.code == "model_not_found" and missing.value.type == "model_not_found"
        assert "no-such-model" in missing.value.message
    code, body = call("POST", f"{stack.base_url}/v1/chat/completions",
                      {"model": "ghost group", "messages": USER})
    assert code == 404 and body["error"] == {"type": "model_not_found", "code": "model_not_found",
                                             "message": body["error"]["message"]}
    assert r.keys("sg:{s:*}:r:*") == stored, "an unknown model stored a request"


def test_a_freshly_declared_model_routes_within_two_seconds(stack: Stack) -> None:
    client = sdk(stack)
    with pytest.raises(openai.NotFoundError):  # the API process has just looked and not found it
        client.chat.completions.create(model="fresh", messages=USER, max_tokens=2)  # type: ignore[arg-type]

    async def declare(c: Any) -> None:  # straight into Redis, as another API process or a worker would
        await declare_group(c, "default", "fresh")

    with_redis(stack.settings.redis_url or "", declare)
    began = time.monotonic()
    tried: list[float] = []

    def routed() -> bool:
        tried.append(time.monotonic())  # routing is decided as the call comes in, not when its answer ends
        try:
            client.chat.completions.create(model="fresh", messages=USER, max_tokens=2)  # type: ignore[arg-type]
        except openai.NotFoundError:
            return False
        return True

    wait_for(routed, timeout=2.5, interval=0.1, what="the new model to route")
    assert tried[-1] - began < 2.0


# ---- unknown groups ------------------------------------------------------------------------------
def test_a_submit_to_an_unknown_group_is_404_and_stores_nothing(empty_stack: Stack, r: redis.Redis) -> None:
    base = empty_stack.base_url
    code, body = call("POST", f"{base}/v1/sessions/s1/requests", {"prompt": "x", "group": "nope"})
    assert code == 404 and body["error"]["type"] == "unknown_group" and "'nope'" in body["error"]["message"]
    code, body = call("POST", f"{base}/v1/chat/completions", {"messages": USER}, headers={"X-Group": "nope"})
    assert code == 404 and body["error"]["type"] == "unknown_group"
    with pytest.raises(openai.NotFoundError):
        sdk(empty_stack).chat.completions.create(model="x", messages=USER,  # type: ignore[arg-type]
                                                 extra_headers={"X-Group": "nope"})
    nothing_stored(r, "nope")

    # default always exists (no worker, nothing declared); a declared group and a served one too
    r.delete(keys.GROUPS)
    submit(base, "s2", prompt="x")
    assert call("PUT", f"{base}/v1/admin/groups/declared", {})[0] == 200
    submit(base, "s3", prompt="x", group="declared")
    empty_stack.add_worker(group="served")
    rid = submit(base, "s4", prompt="x", group="served", max_tokens=2)
    wait_for(lambda: call("GET", f"{base}/v1/requests/{rid}")[1]["status"] == "done", what="the served request")
    nothing_stored_for_group = call("POST", f"{base}/v1/sessions/s5/requests", {"prompt": "x", "group": "nope"})
    assert nothing_stored_for_group[0] == 404 and "nope" not in r.smembers(keys.GROUPS)
    assert r.smembers(keys.GROUPS) == {"default", "declared", "served"}


def test_a_group_declared_by_another_process_is_accepted(empty_stack: Stack) -> None:
    base = empty_stack.base_url
    assert call("POST", f"{base}/v1/sessions/s1/requests", {"prompt": "x", "group": "later"})[0] == 404

    async def declare(c: Any) -> None:
        await declare_group(c, "later")

    with_redis(empty_stack.settings.redis_url or "", declare)
    submit(base, "s1", prompt="x", group="later")  # no negative cache: accepted at once


# ---- a worker's --backend-model ------------------------------------------------------------------
def test_a_worker_whose_model_is_taken_serves_without_it(empty_stack: Stack, r: redis.Redis,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    stack = empty_stack
    assert call("PUT", f"{stack.base_url}/v1/admin/groups/big", {"model": LLAMA})[0] == 200
    with caplog.at_level(logging.WARNING, logger="sluicegate.sessions.runs"):
        stack.add_worker(group="other", backend_model=LLAMA)
    assert any("'big'" in rec.getMessage() and LLAMA in rec.getMessage() for rec in caplog.records)
    assert r.hgetall(keys.MODELS) == {LLAMA: "big"} and "other" in r.smembers(keys.GROUPS)
    rid = submit(stack.base_url, "s", prompt="x", group="other", max_tokens=2)
    wait_for(lambda: call("GET", f"{stack.base_url}/v1/requests/{rid}")[1]["status"] == "done", what="the run")
    wait_for(lambda: [m.id for m in sdk(stack).models.list().data] == ["other"], what="the listing")

    with caplog.at_level(logging.WARNING, logger="sluicegate.sessions.runs"):
        stack.add_worker(group="big", backend_model=f"big={QWEN}")  # never over the operator's name for the group
    assert r.hgetall(keys.MODELS) == {LLAMA: "big"}
    wait_for(lambda: [m.id for m in sdk(stack).models.list().data] == [LLAMA, "other"], what="the listing")
    assert any("declared as model" in rec.getMessage() and QWEN in rec.getMessage() for rec in caplog.records)


# ---- messages ------------------------------------------------------------------------------------
BAD_MESSAGES: list[tuple[list[dict[str, Any]], str]] = [
    ([{"role": "wizard"}], "wizard"),
    ([{"role": "wizard", "content": "hi"}], "wizard"),
    ([{"role": "User", "content": "hi"}], "User"),
    ([{"role": "user"}], "content"),
    ([{"role": "user", "content": None}], "content"),
    ([{"role": "user", "content": 5}], "content"),
    ([{"role": "user", "content": ["text"]}], "content"),
    ([{"role": "assistant"}], "content"),
    ([{"role": "assistant", "content": None, "tool_calls": []}], "content"),
    ([{"role": "tool", "content": "42"}], "tool_call_id"),
    ([{"role": "user", "content": "ok"}, {"role": "system"}], "content"),
]
GOOD_MESSAGES: list[list[dict[str, Any]]] = [
    [{"role": "developer", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    [{"role": "user", "content": "2+2?"},
     {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                           "function": {"name": "add", "arguments": "{}"}}]},
     {"role": "tool", "tool_call_id": "c1", "content": "4"}],
    [{"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
     {"role": "function", "name": "f", "content": "done"}],
]


def test_messages_are_checked(stack: Stack, r: redis.Redis) -> None:
    for messages, needle in BAD_MESSAGES:
        for path, body in (("/v1/chat/completions", {"messages": messages}),
                           ("/v1/sessions/s/requests", {"messages": messages})):
            code, reply = call("POST", f"{stack.base_url}{path}", body)
            assert code == 422 and needle in reply["error"]["message"], (path, messages, reply)
    assert r.keys("sg:{s:*}:r:*") == [] and r.keys("sg:{s:*}:s:*") == []
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        sdk(stack).chat.completions.create(model="default", messages=[{"role": "wizard"}])  # type: ignore
    assert "wizard" in bad.value.message
    for messages in GOOD_MESSAGES:
        code, reply = call("POST", f"{stack.base_url}/v1/chat/completions", {"messages": messages, "max_tokens": 2})
        assert code == 200, (messages, reply)
        code, reply = call("POST", f"{stack.base_url}/v1/sessions/good/requests",
                           {"messages": messages, "max_tokens": 2})
        assert code == 202, (messages, reply)
