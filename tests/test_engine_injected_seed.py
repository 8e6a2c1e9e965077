"""The seed the openai engine adds when the caller sent none and the backend cannot continue an answer (a
regenerated resume then repeats the sampled tokens already streamed) is Sluicegate's, like `priority`: a
backend that refuses it (LiteLLM's UnsupportedParamsError for a model without seeds, drop_params off) is
asked again without it and gets it no more. The caller's own seed is the request's: its refusal is theirs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.fake_backend import FakeBackend, Script, sluicegate_in_front

MODEL = "fake-model"
MESSAGES = [{"role": "user", "content": "hi"}]
NO_SEED = ("litellm.UnsupportedParamsError: anthropic does not support parameters: ['seed']. "
           "To drop these, set `litellm.drop_params=True`")


def refuse_seed(body: dict[str, Any]) -> Script | None:
    """A backend that refuses any body with a seed, as LiteLLM does for a model without seeds."""
    if "seed" in body:
        return Script(error_status=400, error_message=NO_SEED, error_type="invalid_request_error")
    return None


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend(models=[MODEL], default=Script.text("The ", "gate ", "holds."), choose=refuse_seed)


@pytest.fixture
def client(fake: FakeBackend, redis_url: str) -> Iterator[openai.OpenAI]:
    # backend_continue="no": a resume regenerates, so the engine adds a seed (an unidentified backend, Ollama...)
    with sluicegate_in_front(fake, redis_url, backend_continue="no") as (stack, _):
        yield openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0, timeout=30)


def test_an_injected_seed_the_backend_refuses_is_dropped_and_not_sent_again(fake: FakeBackend,
                                                                             client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert first.choices[0].message.content == "The gate holds."
    asked, served = fake.records
    assert isinstance(asked.body.get("seed"), int) and asked.status == 400  # added, refused
    assert "seed" not in served.body  # asked again without it
    second = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in second if c.choices) == "The gate holds."
    assert len(fake.records) == 3 and "seed" not in fake.records[2].body  # learnt: no refused call first


def test_the_callers_own_seed_is_never_dropped(fake: FakeBackend, client: openai.OpenAI) -> None:
    """Before and after the engine learnt to leave its own seed out, a caller's seed goes as given, once: the
    backend's refusal of it is the caller's answer."""
    with pytest.raises(openai.BadRequestError, match="does not support parameters"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=7)
    assert [r.body.get("seed") for r in fake.records] == [7]
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES).choices[0].message.content
    assert len(fake.records) == 3  # the engine's seed refused, then left out
    with pytest.raises(openai.BadRequestError, match="does not support parameters"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=7)
    assert len(fake.records) == 4 and fake.records[3].body.get("seed") == 7 and fake.records[3].status == 400
