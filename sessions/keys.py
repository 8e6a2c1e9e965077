"""The keyspace: every Redis key and channel name, in one place (the Lua side builds the same names
from the prefixes it is given in KEYS[1]; see sessions/lua/includes/keys.lua).

Two planes, each under its own hash tag, so that everything one script touches lives in one slot of
a Redis Cluster and the load spreads over the masters (README, "Growing past one Redis"):

- the **data plane** of a session (its requests, their inputs, the lite queue, the event log and
  its channel) is tagged by the session's *bucket*: a hash of the session id into 1024 buckets,
  written as two characters. The bucket is the first two characters of every request id, so a
  request is found from its id alone. Buckets rather than one tag per session: per-bucket keys (the
  outbox of half-done transitions, the data plane's metrics) are few enough to enumerate without
  SCAN, and 1024 of them spread evenly over any practical number of masters.
- the **control plane** of a group (ready sets, virtual token counters, quotas, runs, leases, slot
  tickets, worker inboxes and control channels, the scheduler's wake-ups) is tagged by the group.

A few global keys are read rarely and written by operators only: the registry of groups and of the
models they serve, the policy and tenant weights (copied into each group's control plane, where
decisions read them), API keys.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

PREFIX = "sg:"
BUCKET_ALPHABET = "0123456789abcdefghijklmnopqrstuv"
BUCKETS_COUNT = len(BUCKET_ALPHABET) ** 2  # 1024
# Histogram bucket bounds in seconds, shared with the Lua scripts (substituted at load time).
BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                              10.0, 30.0, 60.0, 120.0, 300.0)
# Names of groups and tenants, which become parts of keys (groups: the control plane's hash tag).
NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
NAME = re.compile(NAME_PATTERN)  # its compiled form, for the routes that check a name
# Request statuses that end a request (one source for Python; the Lua side gets it substituted).
TERMINAL_STATUSES = ("done", "failed", "cancelled")


# ---- data plane ------------------------------------------------------------------------------
@lru_cache(maxsize=16384)  # a pure function, asked several times a request (ids, keys, channel): 2% of the API
def bucket_of_session(sid: str) -> str:
    """The session's bucket: two characters from a stable hash of its id."""
    n = int.from_bytes(hashlib.sha1(sid.encode()).digest()[:4], "big") % BUCKETS_COUNT
    return BUCKET_ALPHABET[n // 32] + BUCKET_ALPHABET[n % 32]


def all_buckets() -> list[str]:
    return [a + b for a in BUCKET_ALPHABET for b in BUCKET_ALPHABET]


def bucket_of_request(rid: str) -> str:
    return rid[:2]


def data_prefix(bucket: str) -> str:
    """The hash-tagged prefix of one bucket's data plane: every data-plane key starts with it."""
    return f"{PREFIX}{{s:{bucket}}}:"


def session_prefix(sid: str) -> str:
    return data_prefix(bucket_of_session(sid))


def request_prefix(rid: str) -> str:
    return data_prefix(bucket_of_request(rid))


REQUEST_ID = re.compile(r"[0-9a-v]{2}[A-Za-z0-9_-]{1,64}")


def valid_request_id(rid: str) -> bool:
    """A request id as new_request_id makes them: anything else names no request (never a key)."""
    return REQUEST_ID.fullmatch(rid) is not None


def alias(old_rid: str) -> str:
    """String: the new id of a request of the key layout before the cluster change (sluicegate/migrate.py).
    A plain key, in any slot: read only when an id names no request (api/requests_routes.py)."""
    return f"{PREFIX}alias:{old_rid}"


def request(rid: str) -> str:
    return f"{request_prefix(rid)}r:{rid}"


def request_input(rid: str) -> str:
    return f"{request_prefix(rid)}r:{rid}:in"


def session_meta(sid: str) -> str:
    return f"{session_prefix(sid)}s:{sid}:m"


def session_queue(sid: str) -> str:
    return f"{session_prefix(sid)}s:{sid}:q"


def session_log(sid: str) -> str:
    return f"{session_prefix(sid)}s:{sid}:l"


def session_channel(sid: str) -> str:
    """Sharded pub/sub channel (SPUBLISH): a live copy of each log append."""
    return f"{session_prefix(sid)}e:{sid}"


def outbox(bucket: str) -> str:
    """zset rid -> time: heads made ready on the data plane whose control step is not yet confirmed."""
    return f"{data_prefix(bucket)}ob"


def data_metrics(bucket: str) -> str:
    return f"{data_prefix(bucket)}m"


def callbacks_due(bucket: str) -> str:
    """zset rid -> when its callback delivery is due (ms): ended requests with a callback_url (webhooks/)."""
    return f"{data_prefix(bucket)}cb"


def usage_pending(bucket: str) -> str:
    """hash "hour|tenant|group|r|i|o" -> count: usage of ended requests not yet folded (sessions/usage.py)."""
    return f"{data_prefix(bucket)}u"


def usage_folding(bucket: str) -> str:
    """The pending usage taken for folding (renamed from usage_pending), with its fold's sequence in "#"."""
    return f"{data_prefix(bucket)}uf"


def usage_sequence(bucket: str) -> str:
    """The bucket's last fold sequence (usage_take.lua: the next one is past it); expires after 35 days."""
    return f"{data_prefix(bucket)}us"


# ---- control plane ---------------------------------------------------------------------------
def group_prefix(group: str) -> str:
    """The hash-tagged prefix of one group's control plane."""
    return f"{PREFIX}{{g:{group}}}:"


def group_key(group: str, suffix: str) -> str:
    return f"{group_prefix(group)}{suffix}"


def group_metrics(group: str) -> str:
    return group_key(group, "m")


def worker(group: str, wid: str) -> str:
    """The worker's liveness key (a PX lease)."""
    return group_key(group, f"w:{wid}")


def worker_inbox(group: str, wid: str) -> str:
    return group_key(group, f"w:{wid}:in")


def worker_control(group: str, wid: str) -> str:
    """Sharded pub/sub channel of a worker's preemption and cancel notices ("rid|attempt|reason")."""
    return group_key(group, f"w:{wid}:ctl")


# ---- global (operators' writes, rarely read on a request's way) ------------------------------
GROUPS = PREFIX + "groups"  # set of known groups
GROUPS_HINT = GROUPS + ":hint"  # list: a group was just added (a scheduler starts its loop at once, not on its refresh)
MODELS = PREFIX + "models"  # hash model -> the group serving it (a group names at most one)
TENANT_WEIGHTS = PREFIX + "tenants"  # hash tenant -> weight (source; copied into each group's "tw")
POLICY = PREFIX + "policy"  # hash policy field -> value (source; copied into each group's "pol")
API_KEYS = PREFIX + "keys"
API_KEY_IDS = API_KEYS + ":ids"  # hash key_id -> the key's digest (the field of its record in API_KEYS)
API_KEYS_USED = API_KEYS + ":used"  # hash key_id -> when it last authenticated (Unix s; about once a minute)
TENANT_LIMITS = PREFIX + "tenant_limits"  # hash "<tenant>:<limit>" -> int (scheduler/limits.py)
AUDIT = PREFIX + "audit"  # list of admin changes, newest first, capped (api/audit.py)
# hash receiver origin ("<scheme>://<host>:<port>") -> "<since ms> <last ms>": how long no callback attempt to it got
# a timely success (written by the delivery processes, webhooks/delivery.py; a note whose silence is over is deleted
# when a pass reads it: one small key, one slot)
CALLBACKS_SILENT = PREFIX + "cbsilent"
# hash API process id ("<host>:<pid>:<random>") -> "<open SSE streams> <expires ms>": each API process rewrites its
# entry about once a second and deletes it at shutdown; /metrics sums the live ones and deletes lapsed ones
# (api/services.py: one small key, one slot, so every process reports the fleet's open streams)
API_STREAMS = PREFIX + "api_streams"


def usage_hour(hour: int) -> str:
    """hash "tenant|group|r|i|o" -> requests, input and output tokens ended in one hour (Unix s of its start),
    with the last fold applied per bucket in "@<bucket>" (sessions/usage.py); expires after 35 days."""
    return f"{PREFIX}usage:{hour}"


def tenant_active(tenant: str) -> str:
    """Zset of a tenant's requests that may still be queued or running (api/admission.py), request id
    -> submit time: only for a tenant with `max_queued`, tagged by tenant so that one key holds the
    count every API process checks."""
    return f"{PREFIX}{{t:{tenant}}}:act"
LEGACY_PREFIXES = (PREFIX + "r:", PREFIX + "s:", PREFIX + "g:", PREFIX + "w:", PREFIX + "m:")
