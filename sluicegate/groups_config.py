"""The `[groups.NAME]` tables of a `--config` file: several groups (usually one model each) from one `serve`.

Each table may give the group's `model` (sent to its backend and declared in Redis so that chat
requests route to it by `model`), its workers' settings (`engine`, `backend_url`, `backend_api_key`,
`workers`, `slots`, `backend_timeout`, `backend_retries`, `backend_first_token_timeout`,
`backend_idle_timeout`, `backend_probe`, `backend_continue`, `stream_interval_ms`, `sim_tokens_per_second`,
`sim_prefill_ms`) and its quota (`requests_per_second`, `tokens_per_second`, `burst`, `max_concurrency`,
`burst_tokens`).

Precedence, for each group: a flag or `SLUICEGATE_*` variable given explicitly > the group's table >
the file's top-level keys > the defaults. `from_env()` has already layered flags > environment > file
> defaults into one Settings; a group's table is laid over those settings except where a flag or a
variable named the setting, so `SLUICEGATE_WORKERS=1 sluicegate serve --config fleet.toml` gives every
group one worker, while a top-level `workers = 3` is only the default of groups that do not say.
An explicit `--backend-model` overrides the model of the groups it names (a bare `name`: every group).

Everything is checked here, before any process starts, the workers of all groups together too (at most
MAX_TOTAL_WORKERS); a problem is one BadSetting naming the table and the key (the CLI prints `sluicegate:
bad setting: groups.NAME.KEY: ...` and exits 2).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from sluicegate.scheduler.quota import QUOTA_FIELDS, Quota
from sluicegate.sessions.keys import NAME_PATTERN
from sluicegate.sessions.registry import check_model_name
from sluicegate.settings import BadSetting, Settings, bad_setting, check_table, env_values

TABLE = "groups"
# key of a [groups.NAME] table -> the setting it gives that group's workers
WORKER_KEYS = {"model": "backend_model", "engine": "engine", "backend_url": "backend_url",
               "backend_api_key": "backend_api_key", "workers": "workers", "slots": "slots",
               "backend_timeout": "backend_timeout", "backend_retries": "backend_retries",
               "backend_first_token_timeout": "backend_first_token_timeout",
               "backend_idle_timeout": "backend_idle_timeout", "backend_probe": "backend_probe",
               "backend_continue": "backend_continue", "stream_interval_ms": "stream_interval_ms",
               "sim_tokens_per_second": "sim_tokens_per_second", "sim_prefill_ms": "sim_prefill_ms"}
QUOTA_KEYS = QUOTA_FIELDS
KEYS = (*WORKER_KEYS, *QUOTA_KEYS)
# Worker processes serve starts for all its groups together (each group's own cap is Settings' MAX_WORKERS):
# about 14 GB of Python processes, far above what one host runs, so a typo or a large SLUICEGATE_WORKERS given
# to many groups is refused before any starts.
MAX_TOTAL_WORKERS = 256
ALIASES = {"backend_model": "model"}  # the setting's name where the table has its own word


@dataclass(frozen=True)
class GroupConfig:
    """One `[groups.NAME]` table, checked: what its workers change in the settings, and its quota."""

    name: str
    model: str | None
    changes: Mapping[str, Any] = field(default_factory=dict)  # settings for its workers, over the base ones
    quota: Mapping[str, float | int] = field(default_factory=dict)  # only the fields the table gives

    def worker_settings(self, base: Settings) -> Settings:
        """The settings of this group's workers: `base` (flags > env > file > defaults) with the table's
        values where no flag or variable named the setting. Taking `base` late lets serve add the URL of
        the store it started."""
        return base.replace(group=self.name, **self.changes)


def explicit_names(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The settings given by a flag or a `SLUICEGATE_*` variable (an empty value means unset)."""
    given = {name for name, value in flags.items() if value not in (None, "")}
    given |= {name for name, value in env_values(environ).items() if value not in (None, "")}
    return frozenset(given)


def load_groups(settings: Settings, explicit: frozenset[str] = frozenset()) -> list[GroupConfig]:
    """The checked `[groups.NAME]` tables of the config file, in file order; [] when it has none (then
    serve runs the one group of `--group`, as without a file). `explicit` holds the names of settings
    given by flags or variables: those beat the tables."""
    path = settings.config or "the config file"
    for name in settings.extra:  # from_env() refused them already; Settings(extra=...) built in code may hold them
        check_table(name, path)
    tables = settings.extra.get(TABLE)
    if tables is None:
        return []
    if not isinstance(tables, dict) or not tables:
        raise BadSetting(TABLE, f"give one table [groups.NAME] per group, in {path}")
    if "group" in explicit or "group" in settings.model_fields_set:  # the latter: the file's top-level `group`
        given = "--group (or SLUICEGATE_GROUP)" if "group" in explicit else "a top-level `group`"
        raise BadSetting("group", f"{given} names the one group of a config without "
                         f"[groups.NAME] tables; {path} has {', '.join(f'[groups.{n}]' for n in tables)}")
    groups = [_group(settings, explicit, name, table, path) for name, table in tables.items()]
    served: dict[str, str] = {}
    for group in groups:
        if group.model is None:
            continue
        if group.model in served:
            origin = _same_model_origin(settings, explicit, tables, served[group.model], group.name, path)
            raise BadSetting(f"{TABLE}.{group.name}.model", f"`{group.model}` is also the model of "
                             f"[groups.{served[group.model]}], {origin}: chat requests choose a group by model, "
                             "so each model has one group")
        served[group.model] = group.name
    _check_total_workers(settings, groups, path)
    return groups


def _check_total_workers(settings: Settings, groups: list[GroupConfig], path: str) -> None:
    """Serve starts every group's workers: refuse more than MAX_TOTAL_WORKERS in all, naming each group's."""
    counts = {group.name: int(group.changes.get("workers", settings.workers)) for group in groups}
    if sum(counts.values()) > MAX_TOTAL_WORKERS:
        each = ", ".join(f"{name} {count}" for name, count in counts.items())
        raise BadSetting("workers", f"the groups of {path} have {sum(counts.values())} workers in all ({each}); "
                         f"serve starts at most {MAX_TOTAL_WORKERS}")


def _same_model_origin(settings: Settings, explicit: frozenset[str], tables: Mapping[str, Any], first: str,
                       second: str, path: str) -> str:
    """Where two groups' equal model came from: the file, or an explicit --backend-model (whose bare name is
    every group's), so that the message blames what gave it."""
    flag = "--backend-model (or SLUICEGATE_BACKEND_MODEL)"
    given = settings.backend_models()
    from_flag = {name: "backend_model" in explicit and bool(given.get(name) or given.get("*"))
                 for name in (first, second)}
    if not any(from_flag.values()):
        return f"in {path}"
    if all(from_flag.values()):
        bare = " (a bare name is every group's model: give GROUP=MODEL,...)" if "*" in given else ""
        return f"both from {flag}{bare}"
    flagged = first if from_flag[first] else second
    other = second if flagged == first else first
    source = f"[groups.{other}] of {path}" if "model" in tables[other] else f"the top-level backend_model of {path}"
    return f"[groups.{flagged}]'s from {flag}, [groups.{other}]'s from {source}"


def _group(settings: Settings, explicit: frozenset[str], name: str, table: Any, path: str) -> GroupConfig:
    where = f"{TABLE}.{name}"
    if not isinstance(table, dict):
        raise BadSetting(where, f"should be a table [groups.{name}] of the group's settings, in {path}")
    if not re.fullmatch(NAME_PATTERN, name):
        raise BadSetting(where, f"a group name is 1-64 of A-Z a-z 0-9 . _ -, in {path}")
    for key in table:
        if key not in KEYS:
            raise BadSetting(f"{where}.{key}", f"not a key of [groups.{name}], in {path}{_hint(key)}")
    model = _model(settings, explicit, name, table, path)
    changes = {WORKER_KEYS[key]: value for key, value in table.items()
               if key in WORKER_KEYS and key != "model" and WORKER_KEYS[key] not in explicit}
    changes["backend_model"] = model or ""
    merged = {**settings.model_dump(), **changes}
    if merged["engine"] == "openai" and not merged["backend_url"]:
        raise BadSetting(where, f'engine = "openai" needs backend_url (e.g. http://127.0.0.1:8001/v1), in {path}')
    group = GroupConfig(name=name, model=model, changes=changes, quota=_quota(table, where, path))
    try:
        group.worker_settings(settings)  # the same checks as any settings: types, ranges, consistency
    except ValidationError as error:
        problem = bad_setting(error, {})
        key = next((k for k, s in WORKER_KEYS.items() if s == problem.field), problem.field)
        raise BadSetting(f"{where}.{key}", f"{problem.reason}, in {path}") from None
    except BadSetting as problem:
        raise BadSetting(f"{where}.{problem.field}", f"{problem.reason}, in {path}") from None
    return group


def _model(settings: Settings, explicit: frozenset[str], name: str, table: dict[str, Any], path: str) -> str | None:
    """The table's `model`, unless an explicit --backend-model names this group (or all groups); without
    either, what the file's top-level `backend_model` says for it."""
    given = settings.backend_models()
    named = given.get(name) or given.get("*")
    if "backend_model" in explicit and named:
        return named
    if "model" not in table:
        return named
    model = table["model"]
    try:
        check_model_name(model if isinstance(model, str) else "")
    except ValueError:
        raise BadSetting(f"{TABLE}.{name}.model", f"should be the model's name (1-256 characters, no whitespace "
                         f"or control characters), got {model!r}, in {path}") from None
    if "," in model or "=" in model:
        raise BadSetting(f"{TABLE}.{name}.model", f"`{model}`: a model name here cannot hold `,` or `=`, in {path}")
    return model


def _quota(table: dict[str, Any], where: str, path: str) -> dict[str, float | int]:
    """The quota fields the table gives, checked as `PUT /v1/admin/groups/{g}` checks them."""
    given = {key: table[key] for key in QUOTA_KEYS if key in table}
    for key, value in given.items():
        if isinstance(value, bool):
            raise BadSetting(f"{where}.{key}", f"should be a number, got {value!r}, in {path}")
    try:
        return Quota.model_validate(given).model_dump(exclude_unset=True)
    except ValidationError as error:
        first = error.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else "quota"
        raise BadSetting(f"{where}.{key}", f"{first['msg']}, got {first['input']!r}, in {path}") from None


def _hint(key: str) -> str:
    if key in ("group", "name"):
        return " (the table's name is the group's: [groups.NAME])"
    close = [ALIASES[key]] if key in ALIASES else difflib.get_close_matches(key.replace("-", "_"), KEYS, n=1)
    return f" (did you mean `{close[0]}`?)" if close else ""
