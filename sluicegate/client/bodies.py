"""What a call sends: the bodies of a submit, a chat and the admin PUTs (only the fields given, so the
server's defaults stay the server's), the X- headers that carry Sluicegate's fields on the OpenAI route, and
the check that no number JSON cannot carry (nan, inf) is in a body."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from sluicegate.client.errors import InvalidArgument

Priority = int | str  # 0..9 or low|normal|high|critical


class _Keep:
    """The default of an admin field that is left as it is (None means "unlimited" / "default")."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()


def _submit_body(prompt: str | Sequence[Mapping[str, Any]], max_tokens: int | None, priority: Priority | None,
                 tenant: str | None, group: str | None, params: Mapping[str, Any] | None, deadline_ms: int | None,
                 on_deadline_miss: str | None, callback_url: str | None) -> dict[str, Any]:
    """Only what is given: the server's defaults stay the server's."""
    body: dict[str, Any] = {"prompt": prompt} if isinstance(prompt, str) else {"messages": list(prompt)}
    optional = {"max_tokens": max_tokens, "priority": priority, "tenant": tenant, "group": group,
                "params": dict(params) if params else None, "deadline_ms": deadline_ms,
                "on_deadline_miss": on_deadline_miss, "callback_url": callback_url}
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def _chat_call(messages: Sequence[Mapping[str, Any]], model: str | None, stream: bool, session_id: str | None,
               priority: Priority | None, tenant: str | None, group: str | None, max_tokens: int | None,
               deadline_ms: int | None, callback_url: str | None, extra: dict[str, Any]
               ) -> tuple[dict[str, Any], dict[str, str]]:
    """The body and the X- headers that carry Sluicegate's fields on the OpenAI route."""
    body: dict[str, Any] = {"messages": list(messages), "stream": stream, **extra}
    if model is not None:
        body["model"] = model
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    given = {"X-Session-Id": session_id, "X-Priority": priority, "X-Tenant": tenant, "X-Group": group,
             "X-Deadline-Ms": deadline_ms, "X-Callback-Url": callback_url}
    return _json_safe(body), {k: str(v) for k, v in given.items() if v is not None}


def _json_safe(value: Any, where: str = "") -> Any:
    """`value`, or InvalidArgument naming the field that holds nan or inf: JSON cannot carry them, and
    httpx would refuse the whole body with a bare ValueError that names no field."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(422, "invalid_request", f"{where or 'body'}: a finite number, not {value!r}")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _json_safe(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _json_safe(item, f"{where}[{index}]")
    return value


def _admin_fields(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not KEEP}
