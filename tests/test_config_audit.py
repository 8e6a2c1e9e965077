"""What `serve --config` changes in its groups at a start (model, quota) is in the audit log like any admin
change: one `group.update` entry per group it changed, key_id "config", with the group's state before and
after as PUT /v1/admin/groups records it; a start that changes nothing writes nothing. Real Valkey (one server
or a 3-master cluster)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import redis

from sluicegate.groups_config import load_groups
from sluicegate.serve import declare_groups
from sluicegate.sessions import keys
from sluicegate.sessions.connect import async_client
from sluicegate.sessions.registry import declare_group
from sluicegate.settings import from_env
from tests.helpers import ON_CLUSTER
from tests.test_serve_groups_move import run

pytestmark = pytest.mark.usefixtures("no_sluicegate_env")

NO_DEADLINES: dict[str, int] = {}


def entries(r: redis.Redis) -> list[dict[str, Any]]:
    """The audit log, oldest first (without the time)."""
    return [{k: v for k, v in json.loads(raw).items() if k != "at"} for raw in reversed(r.lrange(keys.AUDIT, 0, -1))]


def state(model: str | None, **quota: float) -> dict[str, Any]:
    return {"model": model, "quota": quota, "deadlines_ms": NO_DEADLINES}


def test_a_start_that_changes_groups_audits_each_change_once(tmp_path: Path, redis_url: str,
                                                             r: redis.Redis) -> None:
    fleet = ('[groups.a]\nmodel = "m1"\nworkers = 0\nrequests_per_second = 5\n'
             '[groups.b]\nmodel = "m2"\nworkers = 0\n[groups.idle]\nworkers = 0\n')
    run(tmp_path, redis_url, fleet)
    first = [
        {"key_id": "config", "action": "group.update", "target": "a", "before": state(None),
         "after": state("m1", requests_per_second=5)},
        {"key_id": "config", "action": "group.update", "target": "b", "before": state(None), "after": state("m2")},
    ]  # no entry for `idle`: declared with no model and no quota, nothing of its state changed
    assert entries(r) == first  # old: [] (the file's changes went unaudited)
    run(tmp_path, redis_url, fleet)  # the same file again: nothing changes, nothing is written
    assert entries(r) == first


def test_a_swap_and_an_admin_change_the_file_undoes_are_audited(tmp_path: Path, redis_url: str,
                                                                r: redis.Redis) -> None:
    run(tmp_path, redis_url, '[groups.a]\nmodel = "m1"\nworkers = 0\n[groups.b]\nmodel = "m2"\nworkers = 0\n')
    r.hset(keys.group_key("a", "cfg"), "burst", 9)  # as PUT /v1/admin/groups/a {"burst": 9} would, since then
    r.delete(keys.AUDIT)
    run(tmp_path, redis_url, '[groups.a]\nmodel = "m2"\nworkers = 0\nburst = 3\n'
                               '[groups.b]\nmodel = "m1"\nworkers = 0\n')
    assert entries(r) == [
        {"key_id": "config", "action": "group.update", "target": "a", "before": state("m1", burst=9),
         "after": state("m2", burst=3)},
        {"key_id": "config", "action": "group.update", "target": "b", "before": state("m2"), "after": state("m1")},
    ]



def test_a_group_whose_model_its_workers_declare_is_not_audited_at_every_start(tmp_path: Path, redis_url: str,
                                                                               r: redis.Redis) -> None:
    """A table naming no model leaves the model to its workers (an openai worker declares its backend's); each
    start lets go of it and the workers declare it again: no change of the file's, so no entry."""
    fleet = '[groups.a]\nengine = "openai"\nbackend_url = "http://127.0.0.1:9/v1"\nworkers = 0\n'

    async def workers_declare() -> None:
        client = async_client(redis_url, cluster=ON_CLUSTER, decode_responses=True)
        try:
            await declare_group(client, "a", "llama-3", replace=False)
        finally:
            await client.aclose()

    (tmp_path / "fleet.toml").write_text(fleet)
    settings = from_env({}, config=str(tmp_path / "fleet.toml"), redis_url=redis_url, redis_cluster=ON_CLUSTER)
    for _ in range(3):
        asyncio.run(workers_declare())
        asyncio.run(declare_groups(settings, load_groups(settings)))
    assert entries(r) == []  # old: 3 x "config group.update a: llama-3 -> null"
