"""The usage of a run resumed by continuation, moved back to the whole request (workers/engines/openai.py
`usage_as_uninterrupted`): the continued call's prompt held the output so far, so what its details count
over the prompt (a prefix cache's `cached_tokens`) may exceed the prompt once it is moved back; a count above
the prompt reads as a cache hit of more than 100%."""

from __future__ import annotations

import pytest

from sluicegate.workers.engines.openai import usage_as_uninterrupted

pytestmark = pytest.mark.single_server  # no Redis: once is enough


def test_prompt_details_are_bounded_by_the_prompt_moved_back() -> None:
    continued = {"prompt_tokens": 14, "completion_tokens": 25, "total_tokens": 39,
                 "prompt_tokens_details": {"cached_tokens": 14, "audio_tokens": None},
                 "completion_tokens_details": {"reasoning_tokens": 0}}
    usage = usage_as_uninterrupted(continued, 5)
    assert usage is not None
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (9, 30, 39)
    assert usage["prompt_tokens_details"] == {"cached_tokens": 9, "audio_tokens": None}
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 0}


def test_a_first_attempts_usage_is_as_the_backend_said() -> None:
    first = {"prompt_tokens": 9, "completion_tokens": 30, "total_tokens": 39,
             "prompt_tokens_details": {"cached_tokens": 9}}
    assert usage_as_uninterrupted(first, 0) == first
