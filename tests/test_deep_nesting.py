"""Params or messages nested deeper than MAX_NESTING arrays/objects are a 422 naming the field, never a 5xx,
and the hot path (api/hot_path.py) and FastAPI give the same status for the same body: the hot path's orjson
reads 1024 levels, FastAPI's json.loads about 960 (then its 400), and json.dumps, storing them, ran out of
stack between the two."""

from __future__ import annotations

import sys

import pytest

from sluicegate.sessions.requests import MAX_NESTING, TooDeep, json_text, nested_deeper
from tests.helpers import Stack, call
from tests.test_hot_path import fastapi_path


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def deep_value(depth: int) -> list:
    """A list nested `depth` deep, built without recursion."""
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_the_nesting_is_measured_without_recursion() -> None:
    assert not nested_deeper("x", 0) and nested_deeper({}, 0) and not nested_deeper({}, 1)
    assert not nested_deeper({"a": [1, {"b": []}]}, 4) and nested_deeper({"a": [1, {"b": []}]}, 3)  # 4 deep
    assert not nested_deeper(deep_value(MAX_NESTING), MAX_NESTING)
    assert nested_deeper(deep_value(MAX_NESTING + 1), MAX_NESTING)
    assert nested_deeper(deep_value(10 * sys.getrecursionlimit()), MAX_NESTING)  # no RecursionError
    # a long conversation has more brackets than MAX_NESTING, and is walked, not refused
    wide = [{"role": "user", "content": [{"type": "text", "text": "hi"}]} for _ in range(MAX_NESTING)]
    assert json_text(wide).count("{") == 2 * MAX_NESTING
    for value in (deep_value(MAX_NESTING + 1), deep_value(10 * sys.getrecursionlimit())):
        with pytest.raises(TooDeep):
            json_text(value)
    assert json_text(deep_value(MAX_NESTING)) == "[" * MAX_NESTING + "]" * MAX_NESTING


def test_deep_params_and_messages_are_422_alike_on_both_paths(stack: Stack) -> None:
    submit = "/v1/sessions/deep/requests"
    with fastapi_path(stack) as other:
        answers = {}
        # {"a": <depth>}: the params nest depth + 1; the reviewer's 500s were at 962 (FastAPI) and 974-1022 (hot)
        for depth in (MAX_NESTING - 1, MAX_NESTING, 300, 900, 962, 966, 974, 1000, 1022, 1030):
            body = b'{"prompt": "x", "max_tokens": 1, "params": {"a": ' + nested(depth) + b"}}"
            hot, fastapi = (call("POST", base + submit, raw=body) for base in (stack.base_url, other))
            assert hot[0] == fastapi[0] and hot[0] < 500, (depth, hot, fastapi)
            answers[depth] = hot
        assert answers[MAX_NESTING - 1][0] == 202
        for depth in (MAX_NESTING, 300, 900):
            code, reply = answers[depth]
            assert code == 422 and reply["error"]["message"] == f"params: nested deeper than {MAX_NESTING} " \
                                                                 "arrays/objects", (depth, answers[depth])
        # messages: the list, a message, then its field
        for depth, expected in ((MAX_NESTING - 2, 202), (MAX_NESTING - 1, 422), (1000, None)):
            body = (b'{"messages": [{"role": "user", "content": "x", "x": ' + nested(depth)
                    + b'}], "max_tokens": 1}')
            hot, fastapi = (call("POST", base + submit, raw=body) for base in (stack.base_url, other))
            assert hot[0] == fastapi[0] and hot[0] < 500, (depth, hot, fastapi)
            assert expected is None or hot[0] == expected, (depth, hot)
            if expected == 422:
                assert hot[1]["error"]["message"].startswith("messages: nested deeper"), hot
        # the chat route's extra fields are its params: its parser (the same on both paths) or this bound
        for base in (stack.base_url, other):
            code, reply = call("POST", f"{base}/v1/chat/completions",
                               raw=b'{"messages": [{"role": "user", "content": "x"}], "x": ' + nested(180) + b"}")
            assert code == 200, reply
