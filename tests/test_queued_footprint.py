"""What a queued request stores, trimmed of what its readers already know (a million queued sessions
pay for every byte), with nothing lost to them: a `queued` event is stored without the request_id its
entry already names, and every reader gets it back (sessions/events.py); a prompt without parameters
leaves its input kind and parameters out of the request hash, at the values its readers default to; a
session's meta stores no default log cap, and its boot id in 10 characters."""

from __future__ import annotations

import json

import redis

from sluicegate.sessions import keys
from sluicegate.sessions.events import Event
from sluicegate.sessions.requests import NewRequest
from sluicegate.sessions.runs import RunSpec
from sluicegate.sessions.transitions import LOG_MAX_EVENTS, run_sync
from tests.helpers import ON_CLUSTER
from tests.sched_harness import Harness


def test_a_queued_event_is_stored_without_its_request_id_and_read_with_it(r: redis.Redis) -> None:
    h = Harness(r, cluster=ON_CLUSTER)
    h.add_worker("w0", slots=0)
    first = h.submit("s", priority=3)
    second = h.submit("s", priority=3)
    stored = [entry.split("|", 3) for entry in r.lrange(keys.session_log("s"), 0, -1)]
    assert [(name, rid) for _, name, rid, _ in stored] == [("queued", first), ("queued", second)]
    assert all("request_id" not in json.loads(data) for *_, data in stored)
    read = [(e.event, e.data) for e in h.log("s")]
    assert read == [("queued", {"request_id": first, "position": 0, "priority": 3}),
                    ("queued", {"request_id": second, "position": 1, "priority": 3})]


def test_a_queued_event_stored_with_its_request_id_reads_as_it_was() -> None:
    data = '{"position":2,"request_id":"abQ1","priority":5}'  # as stored before, and by `sluicegate migrate`
    assert Event.parse(f"7|queued|abQ1|{data}").data == data


def test_only_queued_events_gain_a_request_id() -> None:
    assert Event.parse('8|started|abQ1|{"index":0}').data == '{"index":0}'
    assert json.loads(Event.parse("9|queued|abQ1|{}").data) == {"request_id": "abQ1"}


def test_a_prompt_without_parameters_stores_neither_and_reads_as_one(r: redis.Redis) -> None:
    h = Harness(r, cluster=ON_CLUSTER)
    h.add_worker("w0", slots=0)
    plain = h.submit("a")
    chat = NewRequest(session_id="b", max_tokens=4, priority=5, tenant="t", group="default",
                      messages=[{"role": "user", "content": "hi"}], params={"temperature": 0.5},
                      request_id=keys.bucket_of_session("b") + "chat1")
    assert run_sync(h.t.submit(chat))[0] == "ok"
    stored = {rid: h.req(rid) for rid in (plain, chat.request_id)}
    assert "ik" not in stored[plain] and "pa" not in stored[plain]
    assert (stored[chat.request_id]["ik"], stored[chat.request_id]["pa"]) == ("m", '{"temperature":0.5}')
    read = {rid: RunSpec.from_fields(rid, "1", fields) for rid, fields in stored.items()}
    assert (read[plain].input_kind, read[plain].params) == ("p", {})
    assert (read[chat.request_id].input_kind, read[chat.request_id].params) == ("m", {"temperature": 0.5})


def test_the_default_log_cap_is_not_stored_and_a_default_submit_removes_another(r: redis.Redis) -> None:
    """An absent `lm` is the default cap (call.lua trim_log). A process with another cap stores it, and
    the next submit by one with the default takes it away again, as it would overwrite any cap."""
    h = Harness(r, cluster=ON_CLUSTER)
    h.add_worker("w0", slots=0)
    meta = keys.session_meta("s")
    h.submit("s")
    assert r.hget(meta, "lm") is None
    h.t.log_max_events = 500
    h.submit("s")
    assert r.hget(meta, "lm") == "500"
    h.t.log_max_events = LOG_MAX_EVENTS
    h.submit("s")
    assert r.hget(meta, "lm") is None


def test_a_boot_id_is_ten_base_36_characters(r: redis.Redis) -> None:
    h = Harness(r, cluster=ON_CLUSTER)
    h.add_worker("w0", slots=0)
    h.submit("s")
    boot = r.hget(keys.session_meta("s"), "bt")
    assert boot is not None and len(boot) == 10 and boot.isalnum() and boot == boot.lower(), boot
    now_us = int(float(r.time()[0]) * 1_000_000)  # the library loaded before this, within the test's run
    assert now_us - 3_600_000_000 < int(boot, 36) <= now_us + 1_000_000
