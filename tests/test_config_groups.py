"""`serve --config FILE.toml` with `[groups.NAME]` tables: each table is checked before anything starts
(an unknown key names the table, the key and a close match); a flag or variable given explicitly beats
a group's table, which beats the file's top-level keys, which beat the defaults; and end to end, two
groups of two models (the sim engine, and the openai engine on a sim backend) each answer their own
model through the official OpenAI SDK, keep their settings when a worker is restarted, and stop on
Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai import NotFoundError, OpenAI

from sluicegate.cli import build_parser, given_flags, main, settings_from
from sluicegate.embedded import free_port
from sluicegate.groups_config import GroupConfig, explicit_names, load_groups
from sluicegate.settings import BadSetting, Settings, from_env
from sluicegate.workers.sim_backend import create_sim_backend
from tests.helpers import ON_CLUSTER, ROOT, call, healthy, wait_for
from tests.openai_helpers import ServerThread

TWO_GROUPS = """
slots = 3
workers = 2
sim_prefill_ms = 5

[groups.small]
model = "sim-small"
workers = 1
sim_tokens_per_second = 300
requests_per_second = 20
burst = 5

[groups.big]
model = "llama-test"
engine = "openai"
backend_url = "http://127.0.0.1:8001/v1"
slots = 8
max_concurrency = 4
"""


pytestmark = pytest.mark.usefixtures("no_sluicegate_env")


def groups_of(tmp_path: Path, text: str, *argv: str) -> tuple[Settings, list[GroupConfig]]:
    """What `sluicegate serve --config <text> <argv>` would run, with this process's environment."""
    config = tmp_path / "sluicegate.toml"
    config.write_text(text)
    args = build_parser().parse_args(["serve", "--config", str(config), *argv])
    settings = settings_from(args)
    return settings, load_groups(settings, explicit_names(given_flags(args)))


def by_name(settings: Settings, groups: list[GroupConfig]) -> dict[str, Settings]:
    return {group.name: group.worker_settings(settings) for group in groups}


def refusal(capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, *argv: str) -> str:
    """The one line `sluicegate serve --config <text>` prints on stderr when it exits 2."""
    config = tmp_path / "sluicegate.toml"
    config.write_text(text)
    assert main(["serve", "--config", str(config), *argv]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0].replace(str(config), "FILE")


# ---- parsing and precedence ----------------------------------------------------------------------

def test_each_table_is_a_group_with_its_model_settings_and_quota(tmp_path: Path) -> None:
    settings, groups = groups_of(tmp_path, TWO_GROUPS)
    assert [(g.name, g.model) for g in groups] == [("small", "sim-small"), ("big", "llama-test")]
    assert groups[0].quota == {"requests_per_second": 20.0, "burst": 5}
    assert groups[1].quota == {"max_concurrency": 4}
    small, big = by_name(settings, groups).values()
    assert (small.group, small.engine, small.workers, small.slots) == ("small", "sim", 1, 3)
    assert small.sim_tokens_per_second == 300 and small.sim_prefill_ms == 5 and small.backend_model == "sim-small"
    assert (big.group, big.engine, big.workers, big.slots) == ("big", "openai", 2, 8)
    assert big.backend_url == "http://127.0.0.1:8001/v1" and big.backend_models() == {"*": "llama-test"}
    assert settings.group == "default" and settings.workers == 2  # the base settings are left as they were


def test_no_group_tables_is_one_group_as_before(tmp_path: Path) -> None:
    settings, groups = groups_of(tmp_path, "workers = 3\n", "--group", "gpu-a")
    assert groups == [] and settings.group == "gpu-a" and settings.workers == 3


def test_an_explicit_flag_or_variable_beats_the_tables_which_beat_the_top_level(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICEGATE_WORKERS", "1")
    settings, groups = groups_of(tmp_path, TWO_GROUPS, "--slots", "6")
    pools = by_name(settings, groups)
    assert [(p.workers, p.slots) for p in pools.values()] == [(1, 6), (1, 6)]  # env and flag: every group
    assert pools["small"].sim_tokens_per_second == 300  # the table, where nothing explicit says otherwise
    monkeypatch.delenv("SLUICEGATE_WORKERS")
    monkeypatch.setenv("SLUICEGATE_SIM_PREFILL_MS", "40")
    monkeypatch.setenv("SLUICEGATE_BACKEND_URL", "")  # an empty variable means unset: not explicit
    pools = by_name(*groups_of(tmp_path, TWO_GROUPS.replace("sim_prefill_ms = 5", "sim_prefill_ms = 1")))
    assert pools["big"].sim_prefill_ms == 40 and pools["small"].sim_prefill_ms == 40
    assert pools["big"].backend_url == "http://127.0.0.1:8001/v1"
    assert [(p.workers, p.slots) for p in pools.values()] == [(1, 3), (2, 8)]  # table > top level > defaults


def test_the_top_level_keys_are_the_groups_defaults(tmp_path: Path) -> None:
    settings, groups = groups_of(tmp_path, "slots = 5\nbackend_timeout = 9\n[groups.a]\nmodel = 'm-a'\n"
                                           "[groups.b]\nbackend_model = 'x'\n".replace("backend_model", "model"))
    pools = by_name(settings, groups)
    assert all(p.slots == 5 and p.backend_timeout == 9 and p.workers == 2 for p in pools.values())
    assert [p.backend_model for p in pools.values()] == ["m-a", "x"]


def test_an_explicit_backend_model_overrides_the_models_of_the_groups_it_names(tmp_path: Path) -> None:
    settings, groups = groups_of(tmp_path, TWO_GROUPS, "--backend-model", "big=meta-llama/Llama-3.1-8B")
    assert [g.model for g in groups] == ["sim-small", "meta-llama/Llama-3.1-8B"]
    assert by_name(settings, groups)["big"].backend_models() == {"*": "meta-llama/Llama-3.1-8B"}
    # without a model in its table, a group takes what the file's top-level backend_model says for it
    _, groups = groups_of(tmp_path, "backend_model = 'a=m1,b=m2'\n[groups.a]\n[groups.b]\n[groups.c]\n")
    assert [g.model for g in groups] == ["m1", "m2", None]


def test_the_explicit_names_are_those_of_flags_and_variables() -> None:
    assert explicit_names({"slots": "4", "port": None}, {"SLUICEGATE_WORKERS": "1", "SLUICEGATE_ENGINE": "",
                                                         "OTHER": "x"}) == {"slots", "workers"}


def test_the_openai_engine_from_a_flag_applies_to_every_group(tmp_path: Path) -> None:
    text = "[groups.a]\nmodel = 'm-a'\n[groups.b]\nmodel = 'm-b'\n"
    settings, groups = groups_of(tmp_path, text, "--engine", "openai", "--backend-url", "http://127.0.0.1:9/v1")
    assert {(p.engine, p.backend_url) for p in by_name(settings, groups).values()} == {
        ("openai", "http://127.0.0.1:9/v1")}


# ---- refusals: one line, exit 2, naming the table and the key --------------------------------------

@pytest.mark.parametrize(("text", "argv", "line"), [
    ("[groups.a]\nmodel = 'm'\nworkres = 2\n", (),
     "groups.a.workres: not a key of [groups.a], in FILE (did you mean `workers`?)"),
    ("[groups.a]\nbackend_model = 'm'\n", (), "groups.a.backend_model: not a key of [groups.a], in FILE (did you mean "
     "`model`?)"),
    ("[groups.a]\nrequests_per_sec = 2\n", (),
     "groups.a.requests_per_sec: not a key of [groups.a], in FILE (did you mean `requests_per_second`?)"),
    ("[groups.a]\ngroup = 'b'\n", (), "groups.a.group: not a key of [groups.a], in FILE (the table's name is the "
     "group's: [groups.NAME])"),
    ("[groups.a]\nzzz = 1\n", (), "groups.a.zzz: not a key of [groups.a], in FILE"),
    ("[groups.a]\nmodel = 'm'\n[groups.gpu]\nmodel = 'n'\nengine = 'openai'\n", (),
     'groups.gpu: engine = "openai" needs backend_url (e.g. http://127.0.0.1:8001/v1), in FILE'),
    ("[groups.a]\nengine = 'vllm'\n", (), "groups.a.engine: Input should be 'sim' or 'openai', got 'vllm', in FILE"),
    ("[groups.a]\nslots = 0\n", (), "groups.a.slots: Input should be greater than or equal to 1, got 0, in FILE"),
    ("[groups.a]\nengine = 'openai'\nbackend_url = 'localhost:8001'\n", (),
     "groups.a.backend_url: `localhost:8001` should start with http:// or https://, in FILE"),
    ("[groups.a]\nburst = 0\n", (), "groups.a.burst: Input should be greater than or equal to 1, got 0, in FILE"),
    ("[groups.a]\nrequests_per_second = -1\n", (),
     "groups.a.requests_per_second: Input should be greater than or equal to 0.000001, got -1, in FILE"),
    ("[groups.a]\nmax_concurrency = true\n", (), "groups.a.max_concurrency: should be a number, got True, in FILE"),
    ("[groups.a]\nmodel = 'm'\n[groups.b]\nmodel = 'm'\n", (), "groups.b.model: `m` is also the model of [groups.a], "
     "in FILE: chat requests choose a group by model, so each model has one group"),
    ("[groups.a]\nmodel = 'two words'\n", (), "groups.a.model: should be the model's name (1-256 characters, no "
     "whitespace or control characters), got 'two words', in FILE"),
    ("[groups.a]\nmodel = 'a=b'\n", (), "groups.a.model: `a=b`: a model name here cannot hold `,` or `=`, in FILE"),
    ('[groups."a b"]\nmodel = \'m\'\n', (), "groups.a b: a group name is 1-64 of A-Z a-z 0-9 . _ -, in FILE"),
    ("[groups]\na = 1\n", (), "groups.a: should be a table [groups.a] of the group's settings, in FILE"),
    ("[groups]\n", (), "groups: give one table [groups.NAME] per group, in FILE"),
    ("[grups.a]\nmodel = 'm'\n", (), "grups: not a table Sluicegate reads, in FILE (did you mean `[groups.NAME]`?)"),
    ("[groups.a]\nmodel = 'm'\n", ("--group", "x"), "group: --group (or SLUICEGATE_GROUP) names the one group of a "
     "config without [groups.NAME] tables; FILE has [groups.a]"),
])
def test_a_bad_group_table_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str,
                                                  argv: tuple[str, ...], line: str) -> None:
    assert refusal(capsys, tmp_path, text, *argv) == f"sluicegate: bad setting: {line}"


def test_load_groups_raises_bad_setting_for_code_that_calls_it(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[groups.a]\nslot = 2\n")
    with pytest.raises(BadSetting, match=r"^groups\.a\.slot: .*did you mean `slots`"):
        load_groups(from_env(environ={}, config=str(config)))


@pytest.mark.parametrize(("text", "line"), [
    ("[groups.a]\nmodel = 'm1'\n[Groups.b]\nmodel = 'm2'\n",
     "Groups: not a table Sluicegate reads, in FILE (did you mean `[groups.NAME]`?)"),
    ("[server]\nport = 9000\n", "server: not a table Sluicegate reads, in FILE (settings are top-level keys, "
     "before the first table; the tables are [groups.NAME])"),
    ("[groups.a]\nmodel = 'm'\n[api]\nport = 9000\n", "api: not a table Sluicegate reads, in FILE (settings "
     "are top-level keys, before the first table; the tables are [groups.NAME])"),
])
def test_a_table_other_than_groups_is_refused_even_beside_one(tmp_path: Path, text: str, line: str) -> None:
    """Kept, it would never be read: a `[Groups.b]` beside `[groups.a]` would drop group b and its model without a
    word, a `[server] port` would leave the port at its default. (Read here, not by `main(["serve"])`, which on
    a tree that accepts the file would start a whole stack.)"""
    config = tmp_path / "sluicegate.toml"
    config.write_text(text)
    with pytest.raises(BadSetting) as refused:
        load_groups(from_env(environ={}, config=str(config)))
    assert str(refused.value).replace(str(config), "FILE") == line


def test_another_table_is_one_line_and_exit_2_for_every_command(capsys: pytest.CaptureFixture[str],
                                                                tmp_path: Path) -> None:
    """serve (before anything starts), and the commands that read the same file (`api --config` would otherwise
    leave `[server] port` unread too); load_groups refuses settings built in code with such a table too."""
    config = tmp_path / "fleet.toml"
    config.write_text("[groups.a]\nmodel = 'm1'\n[Groups.b]\nmodel = 'm2'\n")
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    done = subprocess.run([sys.executable, "-m", "sluicegate", "serve", "--config", str(config), "--data-dir",
                           str(data_dir), "--port", str(free_port())], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=20)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"sluicegate: bad setting: Groups: not a table Sluicegate reads, in {config} "
                                        "(did you mean `[groups.NAME]`?)"]
    assert not data_dir.exists()  # nothing started
    config.write_text("[server]\nport = 9000\n")
    assert main(["api", "--config", str(config)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"sluicegate: bad setting: server: not a table Sluicegate reads, "
                                                    f"in {config} (settings are top-level keys, before the first "
                                                    f"table; the tables are [groups.NAME])"]
    settings = Settings(extra={"groups": {"a": {"model": "m1"}}, "Groups": {"b": {"model": "m2"}}})
    with pytest.raises(BadSetting, match=r"^Groups: not a table Sluicegate reads, in the config file \(did you mean"):
        load_groups(settings)


def test_a_bad_table_stops_serve_before_anything_starts(tmp_path: Path) -> None:
    config = tmp_path / "fleet.toml"
    config.write_text("[groups.a]\nmodel = 'm'\nengine = 'openai'\n")
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    done = subprocess.run([sys.executable, "-m", "sluicegate", "serve", "--config", str(config), "--data-dir",
                           str(data_dir)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f'sluicegate: bad setting: groups.a: engine = "openai" needs backend_url '
                                        f'(e.g. http://127.0.0.1:8001/v1), in {config}']
    assert not data_dir.exists()  # no embedded server, no logs: nothing started


def test_the_examples_are_valid(tmp_path: Path) -> None:
    for name, models in (("sluicegate.toml", ["llama-3.1-8b", "qwen2.5-7b"]),
                         ("sim-two-models.toml", ["sim-fast", "sim-big"])):
        settings = from_env(environ={}, config=str(Path(ROOT) / "examples" / name))
        groups = load_groups(settings)
        assert [g.model for g in groups] == models, name
        pools = [g.worker_settings(settings) for g in groups]
        assert len({(p.workers, p.slots) for p in pools}) == 2 and all(g.quota for g in groups), name


# ---- end to end ----------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _workers(serve_pid: int) -> dict[int, dict[str, str]]:
    """serve's worker children and their SLUICEGATE_* environment."""
    found = {}
    for pid in _children(serve_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in argv:
            found[pid] = {k: v for k, v in _environ(pid).items() if k.startswith("SLUICEGATE_")}
    return found



def _store_flags(request: pytest.FixtureRequest) -> list[str]:
    """On one server, serve starts its own embedded Valkey in --data-dir; in the cluster pass it runs on
    the suite's 3-master cluster."""
    if not ON_CLUSTER:
        return []
    return ["--redis-url", request.getfixturevalue("redis_url"), "--redis-cluster"]


def test_serve_runs_two_groups_of_two_models_from_one_config(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    backend = ServerThread(create_sim_backend(tokens_per_second=500, prefill_ms=0, model="backend-side")).start()
    config = tmp_path / "two-models.toml"
    config.write_text(f"""
sim_prefill_ms = 0
lease_seconds = 1.5
heartbeat_seconds = 0.3
shutdown_grace_seconds = 2

[groups.sims]
model = "sim-model"
workers = 1
slots = 2
sim_tokens_per_second = 500
requests_per_second = 50
burst = 7

[groups.backed]
model = "backed-model"
engine = "openai"
backend_url = "{backend.url}"
workers = 1
slots = 3

[groups.later]
model = "later-model"
workers = 0
max_concurrency = 2
""")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "sluicegate", "serve", "--config", str(config), "--port",
                             str(port), "--data-dir", str(tmp_path / "data"), *_store_flags(request)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "wb"),  # noqa: SIM115
                            start_new_session=True)
    try:
        wait_for(lambda: healthy(base) or proc.poll() is not None, timeout=60, interval=0.3, what="serve to answer")
        assert proc.poll() is None, log.read_text()[-3000:]
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)

        def listed() -> list[str]:
            return sorted(m.id for m in client.models.list().data)

        wait_for(lambda: listed() == ["backed-model", "sim-model"], timeout=30, interval=0.3,
                 what="both models listed (their workers live)")
        for model, group in (("sim-model", "sims"), ("backed-model", "backed"), ("sim-model", "sims")):
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "which group are you?"}], max_tokens=6)
            completion = raw.parse()
            assert completion.model == model and completion.choices[0].message.content
            assert completion.usage is not None and completion.usage.completion_tokens == 6
            code, status = call("GET", f"{base}/v1/requests/{raw.headers['x-request-id']}")
            assert code == 200 and status["group"] == group and status["status"] == "done", status

        # declared before the workers started: models and quotas, also of a group with no workers
        code, body = call("GET", f"{base}/v1/admin/groups")
        declared = {g["group"]: g for g in body["groups"]}
        assert declared["sims"]["model"] == "sim-model" and declared["backed"]["model"] == "backed-model"
        assert declared["sims"]["quota"] == {"requests_per_second": 50, "burst": 7}
        assert declared["later"]["model"] == "later-model" and declared["later"]["quota"] == {"max_concurrency": 2}
        assert declared["backed"]["quota"] == {}
        assert "later-model" not in listed()  # declared, but no live worker serves it
        with pytest.raises(NotFoundError) as refused:
            client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        assert refused.value.code == "model_not_found"

        # a restarted worker keeps its group's settings
        workers = wait_for(lambda: (w := _workers(proc.pid)) and len(w) == 2 and w, timeout=10, what="2 workers")
        backed = next(pid for pid, e in workers.items() if e["SLUICEGATE_GROUP"] == "backed")
        assert workers[backed]["SLUICEGATE_ENGINE"] == "openai" and workers[backed]["SLUICEGATE_SLOTS"] == "3"
        if not ON_CLUSTER:  # its processes reach the embedded server over its Unix socket, the owner's only
            url, sock = workers[backed]["SLUICEGATE_REDIS_URL"], tmp_path / "data" / "valkey" / "valkey.sock"
            assert url.startswith("unix://:") and f"@{sock}?" in url and sock.stat().st_mode & 0o777 == 0o700
        assert workers[backed]["SLUICEGATE_BACKEND_MODEL"] == "backed-model"
        os.kill(backed, signal.SIGKILL)
        again = wait_for(lambda: {p: e for p, e in _workers(proc.pid).items() if p != backed and
                                  e.get("SLUICEGATE_GROUP") == "backed"}, timeout=15, what="the worker restarted")
        assert [e for e in again.values()] == [workers[backed]]
        completion = client.chat.completions.create(model="backed-model", max_tokens=3,
                                                    messages=[{"role": "user", "content": "still there?"}])
        assert completion.choices[0].message.content

        text = log.read_text()
        assert "group sims: model sim-model, sim engine, workers 1 x 2 slots" in text
        assert "group backed: model backed-model, openai engine, workers 1 x 3 slots" in text
        began = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
        assert proc.wait(20) == 0, log.read_text()[-3000:]
        assert time.monotonic() - began < 20
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        backend.stop()
