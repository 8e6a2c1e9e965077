"""The store refusing work is a 503 with Retry-After, never a 500 (issue 12): out of memory under
noeviction (OOM), a replica (READONLY), a failed snapshot (MISCONF), a long script (BUSY), a server
still loading its data (LOADING)."""

from __future__ import annotations

import pytest
import redis
from redis.exceptions import BusyLoadingError, ReadOnlyError, ResponseError

from sluicegate.api.errors import expected_error_response
from tests.helpers import Stack, call


@pytest.mark.parametrize("error", [
    ResponseError("OOM command not allowed when used memory > 'maxmemory'."),
    ReadOnlyError("You can't write against a read only replica."),
    ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk"),
    ResponseError("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSCRIPT."),
    BusyLoadingError("Redis is loading the dataset in memory"),
    ResponseError("user_function:12: Script attempted to access a non local key in a cluster node script: OOM"),
])
def test_a_store_that_refuses_work_is_a_503_with_retry_after(error: Exception) -> None:
    response = expected_error_response(error)
    if "non local key" in str(error):  # a bug of ours, not the store refusing: never dressed up as a 503
        assert response is None
        return
    assert response is not None and response.status_code == 503 and response.headers["retry-after"] == "1"


@pytest.mark.single_server
def test_out_of_memory_answers_503_and_the_store_recovers(stack: Stack, r: redis.Redis) -> None:
    """A real OOM: the server's maxmemory set below what it uses (noeviction, as Sluicegate needs)."""
    policy = r.config_get("maxmemory-policy")["maxmemory-policy"]
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", 1)
    try:
        code, reply = call("POST", f"{stack.base_url}/v1/sessions/full/requests", {"prompt": "x", "max_tokens": 2})
        assert code == 503 and reply["error"]["type"] == "unavailable", (code, reply)
    finally:
        r.config_set("maxmemory", 0)
        r.config_set("maxmemory-policy", policy)
    code, _ = call("POST", f"{stack.base_url}/v1/sessions/full/requests", {"prompt": "x", "max_tokens": 2})
    assert code == 202
