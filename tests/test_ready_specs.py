"""The stored form of a ready spec (scheduler/lua/includes/ready_specs.lua), run in a real server: every
field a spec can have comes back as it went in, a queued head's usual values are left out, and an entry
stored as JSON before this form still reads."""

from __future__ import annotations

import json
from typing import Any

import redis

from sluicegate.sessions import keys
from sluicegate.sessions.library import _includes

CP = keys.group_prefix("g-1.x")  # a group name with each character class a name may hold but letters


def call(r: redis.Redis, body: str, *args: Any) -> Any:
    """Run `body` after the library's includes (EVAL: nothing is loaded or stored)."""
    return r.eval(_includes() + "\n" + body, 0, *args)


def round_trip(r: redis.Redis, spec: dict[str, Any], sid: str) -> tuple[str, dict[str, Any]]:
    stored, back = call(r, "local s = spec_encode(cjson.decode(ARGV[1]))\n"
                           "return { s, cjson.encode(spec_decode(s, ARGV[2], ARGV[3])) }",
                        json.dumps(spec), sid, CP)
    return stored, json.loads(back)


def test_every_field_of_a_spec_comes_back_as_it_went_in(r: redis.Redis) -> None:
    """To the 14 significant digits that cjson's encoding kept too (a ms clock to 0.1 ms)."""
    names = call(r, "local names = {}\nfor name in pairs(HAS_PLACE) do names[#names + 1] = name end\nreturn names")
    values: dict[str, Any] = {"rid": "00aB-c_9", "sid": "s.1:x@y", "tn": "007", "g": "g-1.x", "p": 3, "ep": 7,
                              "mt": 256, "n": 12, "a": 2, "it": 25, "sub": 1796427856174.5, "pc": 1,
                              "rs": 1796427856180.3, "fs": 41, "dl": 1796427857000, "dm": 1, "bo": 1,
                              "rr": "fair_share", "mx": 8}
    assert set(names) == set(values), "the form has a new field: give it a value here"
    assert set(call(r, "return SPEC_KEYS")) <= set(names), "a spec field without a place in the form"
    stored, back = round_trip(r, values, "s.1:x@y")
    assert back == values
    assert "s.1:x@y" not in stored and "g-1.x" not in stored  # the hash field and the key name give them


def test_a_waiting_head_is_stored_as_its_seven_own_values(r: redis.Redis) -> None:
    spec = {"rid": "8mdfFIIWwVRmYF", "sid": "mem-0", "tn": "t0", "g": "g-1.x", "p": 5, "ep": 5, "mt": 256,
            "n": 0, "a": 0, "it": 25, "sub": 1796427856174.5, "pc": 0, "rs": 1796427856174.5, "fs": 1}
    stored, back = round_trip(r, spec, "mem-0")
    assert stored == "8mdfFIIWwVRmYF|t0|5|256|25|1796427856174.5|1"
    assert back == spec


def test_a_later_field_alone_keeps_the_places_before_it(r: redis.Redis) -> None:
    spec = {"rid": "r1", "sid": "s", "tn": "t", "g": "g-1.x", "p": 5, "ep": 5, "mt": 8, "n": 0, "a": 0, "it": 1,
            "sub": 100, "pc": 0, "rs": 100, "fs": 1, "bo": 1}
    stored, back = round_trip(r, spec, "s")
    assert stored == "r1|t|5|8|1|100|1||||||||1"
    assert back == spec


def test_a_spec_with_a_field_the_form_has_no_place_for_is_kept_whole_as_json(r: redis.Redis) -> None:
    spec = {"rid": "r1", "sid": "s", "tn": "t", "g": "g-1.x", "p": 5, "ep": 5, "mt": 8, "n": 0, "a": 0, "it": 1,
            "sub": 100, "pc": 0, "rs": 100, "fs": 1, "zz": "new"}
    stored, back = round_trip(r, spec, "s")
    assert stored.startswith("{") and back == spec


def test_a_spec_stored_as_json_before_this_form_reads_as_it_did(r: redis.Redis) -> None:
    old = {"ep": 5, "sid": "mem-0", "p": 5, "tn": "t0", "rs": 1796427856174, "n": 0, "a": 0, "fs": 1, "pc": 0,
           "sub": 1796427856174, "mt": 256, "rid": "8mdfFIIWwVRmYF", "it": 25, "g": "default"}
    back = call(r, "return cjson.encode(spec_decode(ARGV[1], 'mem-0', ARGV[2]))", json.dumps(old), CP)
    assert json.loads(back) == old


def test_a_submitted_head_gets_the_spec_that_reading_it_back_gives(r: redis.Redis) -> None:
    """d_submit hands the head's spec on without reading it back: it must be exactly what ready_spec reads
    from the request just stored, with or without a deadline (a ms clock with a fraction, as TIME gives)."""
    body = ("begin_call('S')\n"
            "local outcome, _, spec = d_submit(KEYS[1], ARGV[1], ARGV[2], 't-1', 'g-1.x', '7', '64', 'hello', 'p',"
            " '{}', '3', '', tonumber(ARGV[3]), false, '', ARGV[4], ARGV[5])\n"
            "if outcome ~= 'ok' or not spec then return { 'no spec' } end\n"
            "local back, differ = ready_spec(ARGV[1]), {}\n"
            "for k, v in pairs(spec) do if back[k] ~= v then differ[#differ + 1] = k end end\n"
            "for k, v in pairs(back) do if spec[k] ~= v then differ[#differ + 1] = k end end\n"
            "table.sort(differ)\n"
            "return { cjson.encode(spec), unpack(differ) }")
    seen = []
    for n, (deadline, on_miss) in enumerate((("", "run"), ("250", "fail"), ("250", "run"))):
        sid = f"head-spec-{n}"
        dp = keys.session_prefix(sid)
        rid = keys.bucket_of_session(sid) + f"headspec{n}"
        spec_json, *differ = r.eval(_includes() + "\n" + body, 1, dp, rid, sid, "1796427856174.387", deadline, on_miss)
        assert differ == [], f"fields that differ from the stored request's: {differ}"
        seen.append(json.loads(spec_json))
    assert "dl" not in seen[0] and seen[1]["dm"] == 1 and seen[2]["dl"] and "dm" not in seen[2]
