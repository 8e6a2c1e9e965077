"""A service process freezes its start-up objects and collects young objects less often
(sluicegate/gc_tuning.py); an app embedded in another process (a test, an embedder) leaves the
process's garbage collection alone."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest

from tests.helpers import Stack, fast_settings

pytestmark = pytest.mark.single_server  # no Redis involved in what is checked


def test_a_service_process_freezes_its_start_up_and_raises_the_young_threshold() -> None:
    probe = ("import gc, json\n"
             "from sluicegate.gc_tuning import YOUNG_THRESHOLD, settle_after_start_up\n"
             "before = (gc.get_threshold(), gc.get_freeze_count())\n"
             "settle_after_start_up()\n"
             "print(json.dumps([before, (gc.get_threshold(), gc.get_freeze_count()), YOUNG_THRESHOLD]))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    (before_threshold, before_frozen), (after_threshold, after_frozen), young = json.loads(out.stdout)
    assert before_threshold[0] == 700 and before_frozen == 0
    assert after_threshold == [young, before_threshold[1], before_threshold[2]] and after_frozen > 1_000


def test_an_app_in_someone_elses_process_leaves_its_collection_alone(redis_url: str) -> None:
    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    stack = Stack(fast_settings(redis_url)).start(scheduler=False, workers=0)
    try:
        assert (gc.get_threshold(), gc.get_freeze_count()) == (threshold, frozen)
    finally:
        stack.stop()
