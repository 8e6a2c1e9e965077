"""One settings object for every process.

Every field is a CLI flag (`--session-ttl`) and an environment variable
(`SLUICEGATE_SESSION_TTL`); `serve` hands its settings to its children through the
environment, so a child sees exactly what its parent was given.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

ENV_PREFIX = "SLUICEGATE_"
PRIORITY_NAMES = {"low": 2, "normal": 5, "high": 7, "critical": 9}


@dataclass(frozen=True)
class Settings:
    # network and storage
    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str | None = None
    data_dir: str = "./.sluicegate"
    appendfsync: str = "everysec"
    # processes
    workers: int = 2
    group: str = "default"
    slots: int = 8
    engine: str = "sim"
    backend_url: str | None = None
    backend_api_key: str | None = None
    backend_model: str = ""
    backend_timeout: float = 60.0
    backend_retries: int = 4
    sim_tokens_per_second: float = 50.0
    sim_prefill_ms: float = 20.0
    # sessions and API
    session_ttl: int = 3600
    auth: bool | None = None
    admin_key: str | None = None
    max_body_mb: float = 32.0
    max_tokens_limit: int = 32768
    sse_ping_seconds: float = 15.0
    # liveness
    lease_seconds: float = 3.0
    heartbeat_seconds: float = 1.0
    shutdown_grace_seconds: float = 10.0
    # scheduling policy
    input_token_weight: float = 1.0
    output_token_weight: float = 2.0
    output_estimate_ratio: float = 1.0
    max_wait_seconds: float = 60.0
    class_max_wait: str = ""
    preempt_min_run_ms: float = 50.0
    max_preemptions: int = 20
    sweep_seconds: float = 0.2
    log_level: str = "info"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def auth_enabled(self) -> bool:
        """Auth defaults to off on loopback and on everywhere else."""
        if self.auth is not None:
            return self.auth
        return self.host not in ("127.0.0.1", "localhost", "::1")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def class_max_waits(self) -> dict[int, float]:
        """Max wait per priority class 0..9: `--max-wait-seconds`, overridden by `--class-max-wait 2=120,7=10`."""
        waits = {p: self.max_wait_seconds for p in range(10)}
        for part in filter(None, (p.strip() for p in self.class_max_wait.split(","))):
            cls, _, secs = part.partition("=")
            waits[int(cls)] = float(secs)
        return waits

    def backend_models(self) -> dict[str, str]:
        """Model name per group from `--backend-model`: `m` for all groups, or `g1=m1,g2=m2`."""
        spec = self.backend_model.strip()
        if not spec:
            return {}
        if "=" not in spec:
            return {"*": spec}
        pairs = (p.split("=", 1) for p in spec.split(",") if p.strip())
        return {g.strip(): m.strip() for g, m in pairs}

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        env: dict[str, str] = {}
        for name, value in asdict(self).items():
            if name == "extra" or value is None:
                continue
            if isinstance(value, bool):
                value = "1" if value else "0"
            env[ENV_PREFIX + name.upper()] = str(value)
        return env

    def replace(self, **changes: Any) -> Settings:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(changes)
        return Settings(**data)


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def coerce(name: str, raw: str) -> Any:
    """Convert an environment string to the type of field `name`."""
    kind = Settings.__dataclass_fields__[name].type
    if "bool" in str(kind):
        return parse_bool(raw)
    if "int" in str(kind) and "None" not in str(kind):
        return int(raw)
    if "float" in str(kind):
        return float(raw)
    return raw


def from_env(environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from `SLUICEGATE_*` variables, then explicit overrides (CLI flags)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw is not None and f.name != "extra":
            values[f.name] = coerce(f.name, raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)
