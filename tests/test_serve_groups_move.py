"""`serve --config`'s declare_groups from one run to the next: the file has the last word on the groups
it lists (a model moves between them, two swap, a table that names no model lets its group's old one go),
and a model that a group the file does not list serves stops it before anything is written. Real Valkey
(one server or a 3-master cluster)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis

from sluicegate.groups_config import load_groups
from sluicegate.serve import declare_groups
from sluicegate.sessions import keys
from sluicegate.sessions.registry import ModelConflict
from sluicegate.settings import from_env
from tests.helpers import ON_CLUSTER

pytestmark = pytest.mark.usefixtures("no_sluicegate_env")


def run(tmp_path: Path, redis_url: str, text: str) -> None:
    """One start of `serve --config <text>`: its groups as load_groups checks them, then declare_groups."""
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    settings = from_env({}, config=str(path), redis_url=redis_url, redis_cluster=ON_CLUSTER)
    asyncio.run(declare_groups(settings, load_groups(settings)))


def test_a_model_moves_to_another_group_of_the_file(tmp_path: Path, redis_url: str, r: redis.Redis) -> None:
    run(tmp_path, redis_url, '[groups.a]\nmodel = "m1"\nworkers = 0\n[groups.b]\nworkers = 0\n')
    assert r.hgetall(keys.MODELS) == {"m1": "a"}
    run(tmp_path, redis_url, '[groups.a]\nworkers = 0\n[groups.b]\nmodel = "m1"\nworkers = 0\n')  # a names none now
    assert r.hgetall(keys.MODELS) == {"m1": "b"}
    run(tmp_path, redis_url, '[groups.a]\nmodel = "m2"\nworkers = 0\n[groups.b]\nmodel = "m1"\nworkers = 0\n')
    run(tmp_path, redis_url, '[groups.a]\nmodel = "m1"\nworkers = 0\n[groups.b]\nmodel = "m2"\nworkers = 0\n')  # swap
    assert r.hgetall(keys.MODELS) == {"m1": "a", "m2": "b"}


def test_a_table_without_a_model_lets_its_groups_old_model_go(tmp_path: Path, redis_url: str,
                                                              r: redis.Redis) -> None:
    r.hset(keys.MODELS, "given-at-run-time", "a")  # PUT /v1/admin/groups/a {"model": ...} since the last start
    r.sadd(keys.GROUPS, "a")
    run(tmp_path, redis_url, '[groups.a]\nworkers = 0\n')
    assert r.hgetall(keys.MODELS) == {}
    assert "a" in r.smembers(keys.GROUPS)


def test_a_model_of_a_group_the_file_does_not_list_stops_it_before_any_write(tmp_path: Path, redis_url: str,
                                                                            r: redis.Redis) -> None:
    r.hset(keys.MODELS, "m1", "other")  # a group of another config, or of PUT /v1/admin/groups
    r.hset(keys.MODELS, "old", "a")
    r.sadd(keys.GROUPS, "other", "a")
    with pytest.raises(ModelConflict, match="'m1' is served by group 'other'"):
        run(tmp_path, redis_url, '[groups.a]\nworkers = 0\n[groups.b]\nmodel = "m1"\nworkers = 0\n')
    assert r.hgetall(keys.MODELS) == {"m1": "other", "old": "a"}  # a kept its model: nothing was written
    assert r.smembers(keys.GROUPS) == {"other", "a"}
