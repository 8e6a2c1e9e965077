"""Settings: every bad value is refused before anything starts, from a flag, a variable or the
--config file alike, with one line naming the setting; flags beat the environment, which beats the
file, which beats the defaults; and a child rebuilds exactly its parent's settings from to_env()."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from sluicegate.cli import COMMANDS, build_parser, main, settings_from
from sluicegate.loadtest.targets import RECOVERY_S
from sluicegate.settings import BadSetting, Settings, from_env, setting_names

ROOT = Path(__file__).resolve().parent.parent

# (flags, the setting named in the message, a piece of the reason)
BAD_VALUES = [
    (["--port", "0"], "port", "greater than or equal to 1"),
    (["--port", "65536"], "port", "less than or equal to 65535"),
    (["--port", "http"], "port", "valid integer"),
    (["--slots", "0"], "slots", "greater than or equal to 1"),
    (["--workers", "-1"], "workers", "greater than or equal to 0"),
    (["--session-ttl", "0"], "session_ttl", "greater than or equal to 1"),
    (["--lease-seconds", "0"], "lease_seconds", "greater than 0"),
    (["--sweep-seconds", "-0.2"], "sweep_seconds", "greater than 0"),
    (["--backend-timeout", "inf"], "backend_timeout", "finite"),
    (["--appendfsync", "no"], "appendfsync", "'everysec' or 'always'"),
    (["--engine", "vllm"], "engine", "'sim' or 'openai'"),
    (["--log-level", "loud"], "log_level", "'debug', 'info', 'warning' or 'error'"),
    (["--class-max-wait", "0=abc"], "class_max_wait", "`0=abc` is not CLASS=SECONDS"),
    (["--class-max-wait", "12=5"], "class_max_wait", "`12=5`: the class must be a priority 0..9"),
    (["--class-max-wait", "2=0"], "class_max_wait", "positive number of seconds"),
    (["--backend-model", "a,big=b"], "backend_model", "`a` is not GROUP=MODEL"),
    (["--redis-url", "127.0.0.1:6379"], "redis_url", "should start with redis://"),
    (["--rq-redis-url", "localhost"], "rq_redis_url", "should start with redis://"),
    (["--engine", "openai", "--backend-url", "127.0.0.1:8001"], "backend_url", "should start with http://"),
    (["--engine", "openai"], "backend_url", "the openai engine needs --backend-url"),
    (["--embedded-cluster", "2"], "embedded_cluster", "needs at least 3 masters"),
    (["--heartbeat-seconds", "3"], "heartbeat_seconds", "must be less than --lease-seconds"),
    (["--redis-url", "redis://127.0.0.1:7000/0", "--embedded-cluster", "3"], "embedded_cluster",
     "starts its own cluster"),
    (["--redis-cluster"], "redis_cluster", "needs --redis-url"),
]


pytestmark = pytest.mark.usefixtures("no_sluicegate_env")


def refusal(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The one line `sluicegate <argv>` prints on stderr when it exits 2."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def as_env(flags: list[str]) -> dict[str, str]:
    """`--engine openai --redis-cluster` -> {"SLUICEGATE_ENGINE": "openai", "SLUICEGATE_REDIS_CLUSTER": "1"}."""
    env: dict[str, str] = {}
    for i, arg in enumerate(flags):
        if arg.startswith("--"):
            value = flags[i + 1] if i + 1 < len(flags) and not flags[i + 1].startswith("--") else "1"
            env["SLUICEGATE_" + arg[2:].replace("-", "_").upper()] = value
    return env


def as_toml(flags: list[str]) -> str:
    return "".join(f'{name[len("SLUICEGATE_"):].lower()} = "{value}"\n' for name, value in as_env(flags).items())


@pytest.mark.parametrize(("flags", "field", "reason"), BAD_VALUES)
def test_a_bad_flag_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], flags: list[str], field: str,
                                          reason: str) -> None:
    line = refusal(capsys, ["serve", *flags])
    assert line.startswith(f"sluicegate: bad setting: {field}: ") and reason in line, line


@pytest.mark.parametrize(("flags", "field", "reason"), BAD_VALUES)
def test_a_bad_variable_is_refused_the_same_way(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                                flags: list[str], field: str, reason: str) -> None:
    for name, value in as_env(flags).items():
        monkeypatch.setenv(name, value)
    line = refusal(capsys, ["serve"])
    assert line.startswith(f"sluicegate: bad setting: {field}: ") and reason in line, line


@pytest.mark.parametrize(("flags", "field", "reason"), BAD_VALUES)
def test_a_bad_file_value_is_refused_the_same_way(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                  flags: list[str], field: str, reason: str) -> None:
    config = tmp_path / "sluicegate.toml"
    config.write_text(as_toml(flags))
    line = refusal(capsys, ["serve", "--config", str(config)])
    assert line.startswith(f"sluicegate: bad setting: {field}: ") and reason in line, line


def test_the_message_says_where_the_bad_value_came_from(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(BadSetting, match=r"^port: .* \(from --port\)$"):
        from_env(port="0")
    monkeypatch.setenv("SLUICEGATE_SLOTS", "none")
    with pytest.raises(BadSetting, match=r"^slots: .*'none' \(from SLUICEGATE_SLOTS\)$"):
        from_env()
    monkeypatch.delenv("SLUICEGATE_SLOTS")
    config = tmp_path / "c.toml"
    config.write_text("appendfsync = 'never'\n")
    with pytest.raises(BadSetting, match=rf"^appendfsync: .*'never' \(from {config}\)$"):
        from_env(config=str(config))


def test_the_redis_command_refuses_a_cluster_of_fewer_than_three_masters(capsys: pytest.CaptureFixture[str]) -> None:
    line = refusal(capsys, ["redis", "--cluster", "2", "--port", "7000"])
    assert line.startswith("sluicegate: bad setting: cluster: a Redis Cluster needs at least 3 masters")


def test_an_unknown_key_of_the_file_is_refused_by_name_and_tables_are_kept(capsys: pytest.CaptureFixture[str],
                                                                          tmp_path: Path) -> None:
    config = tmp_path / "sluicegate.toml"
    config.write_text("session-ttl = 60\n")
    line = refusal(capsys, ["serve", "--config", str(config)])
    assert line == f"sluicegate: bad setting: session-ttl: not a setting, in {config} (did you mean `session_ttl`?)"
    config.write_text("sesion_ttl = 60\nworkers = 3\n[groups.big]\nmodel = 'llama-3-70b'\nworkers = 1\n")
    assert refusal(capsys, ["serve", "--config", str(config)]).startswith("sluicegate: bad setting: sesion_ttl: ")
    config.write_text("workers = 3\n[groups.big]\nmodel = 'llama-3-70b'\nworkers = 1\n")
    settings = from_env(config=str(config))
    assert settings.workers == 3 and settings.extra == {"groups": {"big": {"model": "llama-3-70b", "workers": 1}}}


def test_a_missing_or_broken_file_is_a_bad_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    assert refusal(capsys, ["api", "--config", str(missing)]) == f"sluicegate: bad setting: config: no such file: " \
                                                                 f"{missing}"
    broken = tmp_path / "broken.toml"
    broken.write_text("port = \n")
    assert refusal(capsys, ["api", "--config", str(broken)]).startswith(
        f"sluicegate: bad setting: config: cannot read {broken}: ")
    latin1 = tmp_path / "latin1.toml"  # not UTF-8 (an accent saved as Latin-1): was a traceback and exit 1
    latin1.write_bytes(b"# r\xe9glages\nsession_ttl = 600\n")
    assert refusal(capsys, ["api", "--config", str(latin1)]).startswith(
        f"sluicegate: bad setting: config: cannot read {latin1}: ")


# An allowance for a requeued run's start and first token on another worker (not a measured figure:
# `bench recovery` times kill -> resumed and kill -> next token, not the restart alone).
RESTART_ALLOWANCE_S = 0.25
# What a live worker could stall without losing its runs with the 3 s lease and 1 s heartbeat before.
STALL_S = 2.0


def test_the_default_lease_and_heartbeat_fit_the_recovery_target_and_a_2_s_stall() -> None:
    """The defaults' arithmetic, not a measurement (`bench recovery` and `bench soak` measure). DESIGN: a
    dead worker's generation resumes within 3 s; a worker killed just after a heartbeat is found once its
    whole lease has run out, by the next sweep. A live worker survives any stall of up to the lease less
    one beat: it stays 2 s."""
    defaults = Settings()
    assert defaults.lease_seconds + defaults.sweep_seconds + RESTART_ALLOWANCE_S <= RECOVERY_S
    assert defaults.lease_seconds - defaults.heartbeat_seconds >= STALL_S


def test_flags_beat_the_environment_which_beats_the_file_which_beats_the_defaults(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "sluicegate.toml"
    config.write_text("port = 7001\nslots = 3\nsession_ttl = 600\nredis_cluster = true\n"
                      "redis_url = 'redis://127.0.0.1:7100/0'\n")
    monkeypatch.setenv("SLUICEGATE_CONFIG", str(config))
    monkeypatch.setenv("SLUICEGATE_PORT", "7002")
    monkeypatch.setenv("SLUICEGATE_SLOTS", "5")
    monkeypatch.setenv("SLUICEGATE_RQ_REDIS_URL", "redis://127.0.0.1:7200/0")
    settings = settings_from(build_parser().parse_args(["serve", "--port", "7003"]))
    assert settings.port == 7003  # flag > env > file
    assert settings.slots == 5  # env > file
    assert settings.session_ttl == 600 and settings.redis_cluster  # file > defaults
    assert settings.rq_redis_url == "redis://127.0.0.1:7200/0" and settings.lease_seconds == 2.5
    no_cluster = settings_from(build_parser().parse_args(["serve", "--no-redis-cluster"]))
    assert not no_cluster.redis_cluster and no_cluster.port == 7002


def test_a_flag_names_the_file_and_beats_the_variable_naming_another(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("slots = 1\n")
    (tmp_path / "b.toml").write_text("slots = 2\n")
    monkeypatch.setenv("SLUICEGATE_CONFIG", str(tmp_path / "a.toml"))
    assert from_env().slots == 1
    assert from_env(config=str(tmp_path / "b.toml")).slots == 2


def every_field_changed(tmp_path: Path) -> Settings:
    """Settings in which no field has its default (so to_env() has to carry every one of them)."""
    config = tmp_path / "fleet.toml"
    config.write_text("[groups.big]\nmodel = 'llama-3-70b'\n")
    changed = dict(
        config=str(config), host="0.0.0.0", port=9001, redis_url="redis://:pw@127.0.0.1:7000/0", redis_cluster=True,
        rq_redis_url="redis://127.0.0.1:7100/1", data_dir="/tmp/sg", appendfsync="always", embedded_cluster=0,
        cluster=5, workers=0, api_processes=3, redis_max_connections=32, group="gpu-a", slots=3, engine="openai", backend_url="http://127.0.0.1:8001/v1",
        backend_api_key="sk-x", backend_model="default=a,big=b", backend_timeout=7.5, backend_retries=2,
        backend_first_token_timeout=9.5, backend_idle_timeout=4.5, max_attempts=2, backend_probe=False,
        backend_continue="no", metrics_key="mk", metrics_max_tenants=5, password=False,
        stream_interval_ms=12.5, sim_tokens_per_second=123.5, sim_prefill_ms=0.0, session_ttl=60,
        session_log_max_events=500,
        auth=False, admin_key="adm",
        max_body_mb=0.5, max_tokens_limit=100, sse_ping_seconds=2.5, lease_seconds=4.0, heartbeat_seconds=0.75,
        cors_origins="http://127.0.0.1:3000,https://app.test", stream_token_ttl=60,
        shutdown_grace_seconds=0.0, input_token_weight=0.5, output_token_weight=3.0, output_estimate_ratio=0.25,
        max_wait_seconds=30.0, class_max_wait="2=120,7=10", preempt_min_run_ms=0.0, max_preemptions=0,
        fair_share_preemption=False, fair_share_headroom=0.1, deadline_horizon=3.0, deadline_promote_window=0.25,
        deadline_max_boost=2,
        deadline_forecast_factor=0.0, sweep_seconds=0.1,
        log_level="debug", extra={"groups": {"big": {"model": "llama-3-70b"}}},
        webhook_allow="hooks.example.com,127.0.0.1", webhook_secret="whs", webhook_max_attempts=3,
        webhook_backoff=1.5, webhook_timeout=4.0, access_log=True, otel_endpoint="http://127.0.0.1:4318")
    settings = Settings(**changed)
    defaults = Settings()
    # embedded_cluster cannot go with redis_url: the next test covers it
    same = [n for n in Settings.model_fields if getattr(settings, n) == getattr(defaults, n)]
    same.remove("embedded_cluster")
    assert not same, f"give these fields a non-default value here: {same}"
    return settings


def test_to_env_rebuilds_every_field_in_a_child(tmp_path: Path) -> None:
    settings = every_field_changed(tmp_path)
    assert from_env(environ=settings.to_env()) == settings
    embedded = Settings(embedded_cluster=3, redis_cluster=True, auth=True)
    assert from_env(environ=embedded.to_env()) == embedded
    assert from_env(environ=Settings().to_env()) == Settings()
    assert {name.removeprefix("SLUICEGATE_").lower() for name in settings.to_env()} == set(setting_names())


def test_settings_are_exactly_what_they_are_given_and_replace_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICEGATE_PORT", "9000")
    assert Settings().port == 8000 and from_env().port == 9000
    settings = Settings(class_max_wait="2=5,7=1", log_level="WARNING")
    assert settings.log_level == "warning" and settings.class_max_waits()[2] == 5.0
    assert settings.class_max_waits()[0] == settings.max_wait_seconds
    assert settings.replace(port=7000).port == 7000
    with pytest.raises(ValidationError, match="class must be a priority 0..9"):
        settings.replace(class_max_wait="10=1")
    with pytest.raises(ValidationError):
        settings.port = 1  # type: ignore[misc]
    assert Settings(redis_url="", backend_url="").redis_url is None  # an empty variable means unset


def test_every_process_command_takes_the_cluster_flags() -> None:
    for command in ("serve", "api", "scheduler", "worker"):
        assert {"redis_cluster", "rq_redis_url", "config"} <= set(COMMANDS[command][1]), command
    assert "embedded_cluster" in COMMANDS["serve"][1] and "cluster" in COMMANDS["redis"][1]
    args = build_parser().parse_args(["scheduler", "--redis-cluster", "--redis-url", "redis://127.0.0.1:7000/0",
                                      "--rq-redis-url", "redis://127.0.0.1:7100/0"])
    settings = settings_from(args)
    assert settings.redis_cluster and settings.rq_redis_url == "redis://127.0.0.1:7100/0"


def test_serve_with_the_openai_engine_and_no_backend_exits_2_before_starting_anything(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "sluicegate", "serve", "--engine", "openai", "--data-dir",
                           str(data_dir)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=10)
    assert done.returncode == 2 and time.monotonic() - began < 8
    assert done.stderr.splitlines() == ["sluicegate: bad setting: backend_url: the openai engine needs --backend-url "
                                        "(e.g. http://127.0.0.1:8001/v1)"]
    assert not data_dir.exists()  # no embedded server, no logs: nothing started
