"""How a stored request looks from outside (the hash uses short field names to save memory): the API's
GET /v1/requests/{id} and the body of a callback (webhooks/delivery.py) show the same thing."""

from __future__ import annotations

from typing import Any

import orjson

from sluicegate.sessions.callbacks import callback_view


def _seconds(ms: str | None) -> float | None:
    return None if ms is None else round(float(ms) / 1000, 6)


def request_view(rid: str, f: dict[str, str]) -> dict[str, Any]:
    view: dict[str, Any] = {
        "request_id": rid,
        "session_id": f.get("sid"),
        "status": f.get("st"),
        "tenant": f.get("tn"),
        "group": f.get("g"),
        "priority": int(f.get("p", 5)),
        "effective_priority": int(f.get("ep", f.get("p", 5))),
        "max_tokens": int(f.get("mt", 0)),
        "tokens": int(f.get("n", 0)),
        "attempts": int(f.get("a", 0)),
        "preemptions": int(f.get("pc", 0)),
        "failed_attempts": int(f.get("fl", 0)),
        "submitted_at": _seconds(f.get("sub")),
        "started_at": _seconds(f.get("sa")),
        "first_token_at": _seconds(f.get("ft")),
        "worker_took_at": _seconds(f.get("et")),  # the worker's clock: where the first token's time went
        "backend_called_at": _seconds(f.get("ec")),
        "backend_first_token_at": _seconds(f.get("ef")),
        "finished_at": _seconds(f.get("fin")),
        "events_url": f"/v1/requests/{rid}/events",
    }
    if "fr" in f:
        view["finish_reason"] = f["fr"]
    if "us" in f:
        view["usage"] = orjson.loads(f["us"])
    if "err" in f:
        view["error"] = f["err"]
    # the time-to-first-token objective: met or missed at the first token (null: not yet, or none)
    view["deadline_at"] = _seconds(f.get("dl"))
    view["deadline_met"] = None if "dmt" not in f else f["dmt"] == "1"
    if "dl" in f:
        view["on_deadline_miss"] = "fail" if f.get("dm") == "1" else "run"
    callback = callback_view(f)  # push mode: the delivery's state (sessions/callbacks.py)
    if callback is not None:
        view["callback"] = callback
    return view
