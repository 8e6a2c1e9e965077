"""Key names of the Redis keyspace (the same names sessions/lua/common.lua builds)."""

from __future__ import annotations

PREFIX = "sg:"
# Histogram bucket bounds in seconds, shared with the Lua scripts (substituted at load time).
BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                              10.0, 30.0, 60.0, 120.0, 300.0)


def request(rid: str) -> str:
    return f"{PREFIX}r:{rid}"


def request_input(rid: str) -> str:
    return f"{PREFIX}r:{rid}:in"


def session_meta(sid: str) -> str:
    return f"{PREFIX}s:{sid}:m"


def session_queue(sid: str) -> str:
    return f"{PREFIX}s:{sid}:q"


def session_log(sid: str) -> str:
    return f"{PREFIX}s:{sid}:l"


def session_channel(sid: str) -> str:
    return f"{PREFIX}e:{sid}"


def group_key(group: str, suffix: str) -> str:
    return f"{PREFIX}g:{group}:{suffix}"


def worker(wid: str) -> str:
    return f"{PREFIX}w:{wid}"


def worker_inbox(wid: str) -> str:
    return f"{PREFIX}w:{wid}:in"


def worker_control(wid: str) -> str:
    return f"{PREFIX}w:{wid}:ctl"


def metric(name: str) -> str:
    return f"{PREFIX}m:{name}"


LEASES = PREFIX + "leases"
WAKE = PREFIX + "wake"
HINT = PREFIX + "hint"
GROUPS = PREFIX + "groups"
TENANT_WEIGHTS = PREFIX + "tenants"
POLICY = PREFIX + "policy"
WORKERS = PREFIX + "workers"
API_KEYS = PREFIX + "keys"
