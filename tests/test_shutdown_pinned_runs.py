"""A worker's graceful shutdown and pinned runs: when its --shutdown-grace-seconds run out, a run that streamed what
no engine can continue (structured output, a tool call) is not handed back, only to fail on the next worker after a
`resumed` event and a dispatch: the worker ends it `failed` at once, saying why. A resumable run beside it is handed
back and completes elsewhere, nothing lost or repeated; a pinned run that finishes within the grace is untouched.
Every slot ticket comes back exactly once (workers/worker.py `_shutdown`, `_serve`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import redis

from sluicegate.sessions import keys
from sluicegate.sessions.runs import RunSpec
from sluicegate.workers.engines.base import Piece, Token
from sluicegate.workers.engines.sim import SimEngine, sim_text
from tests.helpers import Stack, call, fast_settings, submit
from tests.worker_helpers import Listener, assert_tickets_balanced, token_indices, token_text

TOOL_CALL = {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ""}}]}
JSON = {"response_format": {"type": "json_object"}}


class ToolCallingSim:
    """The sim engine, but a run whose prompt starts with "tool" streams a tool-call delta with its token 5."""

    resume_mode = "continue"

    def __init__(self, tokens_per_second: float) -> None:
        self.sim = SimEngine(tokens_per_second=tokens_per_second, prefill_ms=0.0)

    async def stream(self, run: RunSpec, so_far: str) -> AsyncIterator[Piece]:
        index = run.start_index
        async for text in self.sim.stream(run, so_far):
            calls = (run.prompt or "").startswith("tool") and index == 5
            yield Token(text, delta=TOOL_CALL) if calls else text
            index += 1

    async def aclose(self) -> None:
        await self.sim.aclose()


def non_tokens(listener: Listener) -> list[tuple[str, object]]:
    return [(e.event, e.data.get("message") or e.data.get("reason")) for e in listener.join(30) if e.event != "token"]


def test_pinned_runs_fail_at_the_end_of_the_grace_and_the_others_are_handed_back(redis_url: str,
                                                                                   r: redis.Redis) -> None:
    stack = Stack(fast_settings(redis_url, slots=3)).start(workers=0)
    leaving = stack.add_worker(engine=ToolCallingSim(40.0), shutdown_grace_seconds=0.5)  # 400 tokens: 10 s
    try:
        base = stack.base_url
        prompts = {"json": "give json", "tool": "tool please", "plain": "plain words"}
        rids = {name: submit(base, name, prompt=prompt, max_tokens=400, params=JSON if name == "json" else {})
                for name, prompt in prompts.items()}
        listeners = {name: Listener(base, rid) for name, rid in rids.items()}
        for listener in listeners.values():  # all streaming on the leaving worker, past the tool call (index 5)
            started, _ = listener.first(lambda e: e.event == "started")
            assert started.data["worker"] == leaving
            listener.first(lambda e: e.event == "token" and e.data["index"] >= 10)
        survivor = stack.add_worker()  # somewhere for the handed-back run to go

        stack.stop_service(leaving)  # its shutdown: the 0.5 s grace runs out on all three

        for name, streamed in (("json", "structured output"), ("tool", "a tool call")):
            message = (f"the worker shut down (its --shutdown-grace-seconds of 0.5 s ran out) while the run streamed "
                       f"{streamed}, which no engine can continue: call again")
            events = listeners[name].join(30)
            # ended on the leaving worker, at once: never handed back (no `preempted`, no `resumed`)
            assert non_tokens(listeners[name]) == [("queued", None), ("started", None), ("error", message)], name
            assert token_indices(events) == list(range(len(token_indices(events)))), name
            info = call("GET", f"{base}/v1/requests/{rids[name]}")[1]
            assert info["status"] == "failed" and info["attempts"] == 1, info
        events = listeners["plain"].join(30)  # handed back, completed on the survivor: nothing lost or repeated
        assert [e.data["reason"] for e in events if e.event == "preempted"] == ["worker_shutdown"]
        assert [e.data["worker"] for e in events if e.event == "resumed"] == [survivor]
        assert events[-1].event == "done" and token_indices(events) == list(range(400))
        assert token_text(events) == sim_text(prompts["plain"], 400)
        # every ticket back once: the survivor's 3 idle, none held, none left of the leaving worker's
        assert_tickets_balanced(r, expected_slots=3)
        assert r.llen(keys.group_key("default", "idle")) == 3 and r.hlen(keys.group_key("default", "tk")) == 0
        assert not r.hexists(keys.group_key("default", "workers"), leaving)
    finally:
        stack.stop()


def test_a_pinned_run_that_finishes_within_the_grace_is_untouched(redis_url: str, r: redis.Redis) -> None:
    stack = Stack(fast_settings(redis_url, slots=2)).start(workers=0)
    leaving = stack.add_worker(sim_tokens_per_second=40.0, shutdown_grace_seconds=20.0)  # 60 tokens: 1.5 s
    try:
        rid = submit(stack.base_url, "json", prompt="give json", max_tokens=60, params=JSON)
        listener = Listener(stack.base_url, rid)
        listener.first(lambda e: e.event == "token" and e.data["index"] >= 5)

        stack.stop_service(leaving)

        events = listener.join(30)
        assert [e.event for e in events if e.event != "token"] == ["queued", "started", "done"]
        assert token_indices(events) == list(range(60)) and token_text(events) == sim_text("give json", 60)
        assert call("GET", f"{stack.base_url}/v1/requests/{rid}")[1]["attempts"] == 1
        assert r.llen(keys.group_key("default", "idle")) == 0 and r.hlen(keys.group_key("default", "tk")) == 0
    finally:
        stack.stop()
