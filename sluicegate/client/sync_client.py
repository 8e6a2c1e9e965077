"""The blocking client, `Client`, and its streamed chat, `ChatStream`: each call is one request and its
answer, checked (answers.py) or turned into an error (errors.py); `stream()` follows an event stream with
follow.py's resume and retry."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import Any, Literal, overload

import httpx
from httpx_sse import EventSource, SSEError, connect_sse

from sluicegate.client.addresses import _quoted, _session_path
from sluicegate.client.answers import (
    ANY_OBJECT,
    CHAT,
    GROUP,
    GROUPS,
    REQUEST,
    STATS,
    SUBMITTED,
    TENANT,
    TENANTS,
    Event,
    Shape,
    Submitted,
    _chunk,
    _json_of,
    _shaped,
    _submitted,
)
from sluicegate.client.base import _Base
from sluicegate.client.bodies import KEEP, Priority, _admin_fields, _chat_call, _json_safe, _submit_body
from sluicegate.client.errors import (
    _body_error,
    _cut,
    _error_body,
    _error_from,
    _not_an_event_stream,
    _success,
    _undecodable,
    _unreachable,
)
from sluicegate.client.follow import _Retry


def _read_chunks(response: httpx.Response, url: str,
                 request_id: str | None) -> Generator[dict[str, Any], None, None]:
    """Yields {} once (entered), then the chunks; closes the response however it ends."""
    try:
        yield {}
        for sse in EventSource(response).iter_sse():
            chunk = _chunk(sse, request_id)
            if chunk is None:
                return
            yield chunk
    except SSEError as error:  # before TransportError, which httpx-sse's SSEError subclasses
        raise _not_an_event_stream(error, request_id) from error
    except httpx.DecodingError as error:  # a RequestError, not a TransportError
        raise _undecodable(response, error, request_id) from error
    except httpx.TransportError as error:
        raise _cut(error, url, request_id) from error
    finally:
        response.close()


class ChatStream:
    """A streamed chat: iterate it for the `chat.completion.chunk` dicts. It owns an open response: read it
    to its end, `close()` it or use it as a context manager; one dropped unread is closed when collected.
    `request_id` and `session_id` come from the answer's headers (`X-Request-Id`, `X-Session-Id`): a cut
    stream is not resumed, `stream(request_id=...)` reads the rest."""

    def __init__(self, response: httpx.Response, url: str) -> None:
        self.response = response
        self.request_id: str | None = response.headers.get("x-request-id")
        self.session_id: str | None = response.headers.get("x-session-id")
        # Entered before it is handed out (the generator holds no reference back to self): its finally closes
        # the response however it ends, also when the stream is dropped unread.
        self._chunks = _read_chunks(response, url, self.request_id)
        next(self._chunks)

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Client(_Base):
    """A blocking client; use it as a context manager (or call close()) to release its connections."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, timeout: float = 30.0,
                 stream_read_timeout: float = 60.0, reconnect_timeout: float = 60.0, max_backoff: float = 2.0,
                 chat_timeout: float | None = None, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(url, api_key=api_key, timeout=timeout, stream_read_timeout=stream_read_timeout,
                         reconnect_timeout=reconnect_timeout, max_backoff=max_backoff, chat_timeout=chat_timeout)
        self.http = httpx.Client(base_url=self.url, headers=self._headers(), timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _send(self, method: str, path: str, *, json_body: Any = None, params: Mapping[str, Any] | None = None,
              headers: Mapping[str, str] | None = None, timeout: Any = httpx.USE_CLIENT_DEFAULT) -> httpx.Response:
        """A 2xx answer, its body read; raises the SluicegateError of any other (a 3xx too), of a body that
        does not decode, or of no answer."""
        request = self.http.build_request(method, path, json=json_body, params=params, headers=headers,
                                          timeout=timeout)
        try:
            response = self.http.send(request, stream=True)
            try:
                response.read()
            except httpx.DecodingError as error:  # a RequestError, not a TransportError
                raise _undecodable(response, error) from error
            finally:
                response.close()
        except httpx.TransportError as error:
            raise _unreachable(error, self.shown_url + path) from error
        if not _success(response):
            raise _error_from(response, response.content)
        return response

    def _call(self, method: str, path: str, body: Any = None, params: Mapping[str, Any] | None = None,
              shape: Shape = ANY_OBJECT) -> dict[str, Any]:
        response = self._send(method, path, json_body=_json_safe(body), params=params)
        return _shaped(response, _json_of(response), shape)

    # requests
    def submit(self, session_id: str, prompt: str | Sequence[Mapping[str, Any]], *, max_tokens: int | None = None,
               priority: Priority | None = None, tenant: str | None = None, group: str | None = None,
               params: Mapping[str, Any] | None = None, deadline_ms: int | None = None,
               on_deadline_miss: str | None = None, callback_url: str | None = None) -> Submitted:
        """Queue a request in the session (`prompt` is a string, or a list of chat messages)."""
        body = _submit_body(prompt, max_tokens, priority, tenant, group, params, deadline_ms, on_deadline_miss,
                            callback_url)
        return _submitted(self._call("POST", f"{_session_path(session_id)}/requests", body, shape=SUBMITTED))

    def request(self, request_id: str, *, include_output: bool = False) -> dict[str, Any]:
        """Status, tokens so far and timestamps (with `include_output`, the text so far too)."""
        params = {"include": "output"} if include_output else None
        return self._call("GET", f"/v1/requests/{_quoted(request_id)}", params=params, shape=REQUEST)

    def cancel(self, request_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/requests/{_quoted(request_id)}", shape=REQUEST)

    def stream(self, *, session_id: str | None = None, request_id: str | None = None, after: int | None = None,
               reconnect_timeout: float | None = None,
               on_reconnect: Callable[[Exception, float], None] | None = None) -> Iterator[Event]:
        """The events of a request (ends after its terminal event) or of a session (never ends by itself),
        after the event id `after` when given; reconnects and resumes by itself (see the module doc)."""
        follow = self._follow(session_id, request_id, after, reconnect_timeout, on_reconnect)
        while not follow.ended:
            try:
                with connect_sse(self.http, "GET", follow.path, headers=follow.headers(),
                                 timeout=self.stream_timeout) as source:
                    response = source.response
                    if response.status_code == 204:  # a request's stream resumed at or past its terminal event
                        return
                    if response.status_code != 200:
                        raise follow.refused(response, _error_body(response))
                    follow.connected()
                    try:
                        for sse in source.iter_sse():
                            event = follow.accept(sse)
                            if event is not None:
                                yield event
                                if follow.ended:
                                    return
                    except httpx.DecodingError as error:  # retried as a 5xx is: a proxy's mangling may pass
                        raise follow.unreadable(_undecodable(response, error)) from error
                    raise follow.cut_short(response)
            except SSEError as error:  # first: it is a TransportError too, which would be retried for ever
                raise _not_an_event_stream(error) from error
            except (httpx.LocalProtocolError, httpx.UnsupportedProtocol) as error:  # never sent: retrying is no use
                raise _unreachable(error, self.shown_url + follow.path) from error
            except (_Retry, httpx.TransportError) as error:
                cause = error.error if isinstance(error, _Retry) else error
                time.sleep(follow.backoff(cause))

    # OpenAI-compatible chat
    @overload
    def chat(self, messages: Sequence[Mapping[str, Any]], *, model: str | None = ..., stream: Literal[False] = ...,
             session_id: str | None = ..., priority: Priority | None = ..., tenant: str | None = ...,
             group: str | None = ..., max_tokens: int | None = ..., deadline_ms: int | None = ...,
             callback_url: str | None = ..., **extra: Any) -> dict[str, Any]: ...

    @overload
    def chat(self, messages: Sequence[Mapping[str, Any]], *, model: str | None = ..., stream: Literal[True],
             session_id: str | None = ..., priority: Priority | None = ..., tenant: str | None = ...,
             group: str | None = ..., max_tokens: int | None = ..., deadline_ms: int | None = ...,
             callback_url: str | None = ..., **extra: Any) -> ChatStream: ...

    def chat(self, messages: Sequence[Mapping[str, Any]], *, model: str | None = None, stream: bool = False,
             session_id: str | None = None, priority: Priority | None = None, tenant: str | None = None,
             group: str | None = None, max_tokens: int | None = None, deadline_ms: int | None = None,
             callback_url: str | None = None, **extra: Any) -> dict[str, Any] | ChatStream:
        """POST /v1/chat/completions: the `chat.completion` dict (waited for as long as its request takes,
        unless the client's `chat_timeout` is set), or with `stream=True` a `ChatStream` of
        `chat.completion.chunk` dicts (opened before this returns, so a refused call raises here; close it,
        or read it to its end, to free its connection; a dropped chat stream is not resumed: follow its
        `request_id` with stream() for that). Other OpenAI fields (temperature, tools, ...) go in `extra`."""
        body, headers = _chat_call(messages, model, stream, session_id, priority, tenant, group, max_tokens,
                                   deadline_ms, callback_url, extra)
        if not stream:
            response = self._send("POST", "/v1/chat/completions", json_body=body, headers=headers,
                                  timeout=self.chat_timeout)
            payload = _json_of(response)
            failed = _body_error(payload, response.headers.get("x-request-id"))
            if failed is not None:
                raise failed
            return _shaped(response, payload, CHAT)
        request = self.http.build_request("POST", "/v1/chat/completions", json=body,
                                          headers={**headers, "Accept": "text/event-stream"},
                                          timeout=self.stream_timeout)
        try:
            response = self.http.send(request, stream=True)
        except httpx.TransportError as error:
            raise _unreachable(error, self.shown_url + "/v1/chat/completions") from error
        if not _success(response):
            try:
                raise _error_from(response, _error_body(response))
            finally:
                response.close()
        return ChatStream(response, self.shown_url + "/v1/chat/completions")

    # admin (the admin key when auth is on)
    def set_quota(self, group: str, *, requests_per_second: float | None = KEEP, tokens_per_second: float | None = KEEP,
                  burst: int | None = KEEP, max_concurrency: int | None = KEEP, burst_tokens: float | None = KEEP,
                  model: str | None = KEEP) -> dict[str, Any]:
        """Set a group's quota fields: the ones not given are kept, None removes a limit (unlimited)."""
        fields = _admin_fields(requests_per_second=requests_per_second, tokens_per_second=tokens_per_second,
                               burst=burst, max_concurrency=max_concurrency, burst_tokens=burst_tokens, model=model)
        return self._call("PUT", f"/v1/admin/groups/{_quoted(group)}", fields, shape=GROUP)

    def set_weight(self, tenant: str, weight: float) -> dict[str, Any]:
        """A tenant's fair-share weight (default 1.0)."""
        return self._call("PUT", f"/v1/admin/tenants/{_quoted(tenant)}", {"weight": weight}, shape=TENANT)

    def set_tenant(self, tenant: str, *, weight: float = KEEP, max_priority: Priority | None = KEEP,
                   max_streams: int | None = KEEP, **limits: Any) -> dict[str, Any]:
        """A tenant's weight and guardrails: fields not given are kept, None goes back to the default."""
        fields = _admin_fields(weight=weight, max_priority=max_priority, max_streams=max_streams, **limits)
        return self._call("PUT", f"/v1/admin/tenants/{_quoted(tenant)}", fields, shape=TENANT)

    def groups(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/admin/groups", shape=GROUPS)["groups"]

    def tenants(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/admin/tenants", shape=TENANTS)["tenants"]

    def stats(self) -> dict[str, Any]:
        """Queue depth by group, priority and tenant; running; workers; quotas; tenants."""
        return self._call("GET", "/v1/admin/stats", shape=STATS)
