"""The Lua function library: assembled here from the includes and functions of sessions/lua/ (the
data plane) and scheduler/lua/ (the control plane, and the single-server forms that run both planes'
steps of a transition in one call). The Lua files are data; every caller calls the functions by name.

Loaded once per server (FUNCTION LOAD), on every master of a cluster: the includes run at load time
and each function file becomes a function of the library. The library's name and its functions'
names carry a digest of the source, so processes of two versions (a rolling upgrade) each call their
own code.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

from sluicegate.sessions import keys
from sluicegate.settings import LOG_MIN_EVENTS, Settings

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "sessions" / "lua"
CONTROL_DIR = ROOT / "scheduler" / "lua"
INCLUDES = (DATA_DIR / "includes" / "keys.lua", DATA_DIR / "includes" / "log_ids.lua",
            DATA_DIR / "includes" / "call.lua",
            DATA_DIR / "includes" / "metrics.lua", DATA_DIR / "includes" / "ended.lua",
            DATA_DIR / "includes" / "requests.lua",
            CONTROL_DIR / "includes" / "policy.lua", CONTROL_DIR / "includes" / "ready_specs.lua",
            CONTROL_DIR / "includes" / "fairness.lua",
            CONTROL_DIR / "includes" / "quotas.lua", CONTROL_DIR / "includes" / "runs.lua",
            CONTROL_DIR / "includes" / "preemption.lua", CONTROL_DIR / "includes" / "dispatch.lua")
DATA_FUNCTIONS = ("submit", "start", "append", "finish", "handback", "cancel", "expire", "read_log", "outbox",
                  "outbox_done")
CONTROL_FUNCTIONS = ("ready", "release", "withdraw", "heartbeat", "register_worker", "sweep", "pin", "set_weight",
                     "set_quota", "note_behind")
SINGLE_SERVER_FUNCTIONS = ("submit_one", "finish_one", "handback_one", "cancel_one")
FUNCTIONS = DATA_FUNCTIONS + CONTROL_FUNCTIONS + SINGLE_SERVER_FUNCTIONS
# Functions that only read, flagged so: the server runs them where it refuses writes (a replica, or
# a full server under noeviction).
READ_ONLY = frozenset({"read_log"})


def policy_fields(settings: Settings) -> dict[str, float]:
    """The policy as the Lua side names it (sg:policy, and each group's copy)."""
    fields: dict[str, float] = {
        "w_in": settings.input_token_weight,
        "w_out": settings.output_token_weight,
        "est": settings.output_estimate_ratio,
        "min_run": settings.preempt_min_run_ms,
        "max_pre": settings.max_preemptions,
        "fsp": 1 if settings.fair_share_preemption else 0,
        "fsr": settings.fair_share_headroom,
        "dlh": settings.deadline_horizon * 1000,
        "dlw": settings.deadline_promote_window * 1000,
        "dlb": settings.deadline_max_boost,
        "dlf": settings.deadline_forecast_factor,
    }
    for cls, seconds in settings.class_max_waits().items():
        fields[f"mw{cls}"] = seconds
    return fields


def function_path(name: str) -> Path:
    if name in DATA_FUNCTIONS:
        return DATA_DIR / f"{name}.lua"
    if name in CONTROL_FUNCTIONS:
        return CONTROL_DIR / f"{name}.lua"
    return CONTROL_DIR / "single_server" / f"{name}.lua"


@cache
def function_source(name: str) -> str:
    """One function's own text, as in its file."""
    return function_path(name).read_text()


@cache
def _includes() -> str:
    constants = {
        "{{BUCKETS}}": ", ".join(repr(b) for b in keys.BUCKETS),
        "{{TERMINAL}}": ", ".join(f"{s} = true" for s in keys.TERMINAL_STATUSES),
        "{{POLICY_DEFAULTS}}": ", ".join(f"{k} = {v!r}" for k, v in policy_fields(Settings()).items()),
        "{{LOG_MIN_EVENTS}}": str(LOG_MIN_EVENTS),
        # the code's default (as Settings() always is: it reads no environment): a meta without `lm` means
        # this cap to every process, and d_submit stores any other
        "{{LOG_MAX_EVENTS}}": str(Settings.model_fields["session_log_max_events"].default),
    }
    text = "\n".join(path.read_text() for path in INCLUDES)
    for marker, value in constants.items():
        text = text.replace(marker, value)
    return text


@cache
def digest() -> str:
    text = _includes() + "".join(function_source(name) for name in FUNCTIONS)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def function_name(name: str) -> str:
    return f"sg_{digest()}_{name}"


@cache
def library_source() -> str:
    """The whole library: the includes, then each function registered as a function of (KEYS, ARGV),
    its first argument the call's flags (see includes/call.lua)."""
    parts = [f"#!lua name=sluicegate_{digest()}", _includes()]
    for name in FUNCTIONS:
        flags = ", flags = { 'no-writes' }" if name in READ_ONLY else ""
        parts.append(f"redis.register_function{{ function_name = '{function_name(name)}', "
                     f"callback = function(KEYS, ARGV)\nbegin_call(ARGV[1])\nreturn end_call(pcall(function()\n"
                     f"{function_source(name)}\nend))\nend{flags} }}")
    return "\n".join(parts) + "\n"
