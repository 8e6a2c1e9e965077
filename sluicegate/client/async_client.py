"""The asyncio client, `AsyncClient`, and its streamed chat, `AsyncChatStream`: the calls of sync_client.py,
awaited, on httpx's AsyncClient."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Literal, overload

import httpx
from httpx_sse import EventSource, SSEError, aconnect_sse

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
    _aerror_body,
    _body_error,
    _cut,
    _error_from,
    _not_an_event_stream,
    _success,
    _undecodable,
    _unreachable,
)
from sluicegate.client.follow import _Retry


async def _aread_chunks(response: httpx.Response, url: str,
                        request_id: str | None) -> AsyncGenerator[dict[str, Any], None]:
    """As _read_chunks."""
    try:
        yield {}
        async for sse in EventSource(response).aiter_sse():
            chunk = _chunk(sse, request_id)
            if chunk is None:
                return
            yield chunk
    except SSEError as error:  # before TransportError, which httpx-sse's SSEError subclasses
        raise _not_an_event_stream(error, request_id) from error
    except httpx.DecodingError as error:  # as in _read_chunks
        raise _undecodable(response, error, request_id) from error
    except httpx.TransportError as error:
        raise _cut(error, url, request_id) from error
    finally:
        await response.aclose()


class AsyncChatStream:
    """As ChatStream, for `async for`: `await aclose()` or `async with` it. One dropped unread is closed by
    its event loop (asyncio finalizes the entered async generator that owns the response)."""

    def __init__(self, response: httpx.Response, url: str) -> None:
        self.response = response
        self.request_id: str | None = response.headers.get("x-request-id")
        self.session_id: str | None = response.headers.get("x-session-id")
        self._chunks = _aread_chunks(response, url, self.request_id)

    @classmethod
    async def open(cls, response: httpx.Response, url: str) -> AsyncChatStream:
        stream = cls(response, url)
        await anext(stream._chunks)  # entered, as in ChatStream
        return stream

    def __aiter__(self) -> AsyncChatStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        return await anext(self._chunks)

    async def aclose(self) -> None:
        await self._chunks.aclose()

    async def __aenter__(self) -> AsyncChatStream:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()


class AsyncClient(_Base):
    """The asyncio twin of `Client`: the same methods, awaited; `stream()` and a streamed `chat()` are
    async iterators. Use `async with` (or `await aclose()`)."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, timeout: float = 30.0,
                 stream_read_timeout: float = 60.0, reconnect_timeout: float = 60.0, max_backoff: float = 2.0,
                 chat_timeout: float | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(url, api_key=api_key, timeout=timeout, stream_read_timeout=stream_read_timeout,
                         reconnect_timeout=reconnect_timeout, max_backoff=max_backoff, chat_timeout=chat_timeout)
        self.http = httpx.AsyncClient(base_url=self.url, headers=self._headers(), timeout=timeout,
                                      transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _send(self, method: str, path: str, *, json_body: Any = None,
                    params: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None,
                    timeout: Any = httpx.USE_CLIENT_DEFAULT) -> httpx.Response:
        """As Client._send."""
        request = self.http.build_request(method, path, json=json_body, params=params, headers=headers,
                                          timeout=timeout)
        try:
            response = await self.http.send(request, stream=True)
            try:
                await response.aread()
            except httpx.DecodingError as error:
                raise _undecodable(response, error) from error
            finally:
                await response.aclose()
        except httpx.TransportError as error:
            raise _unreachable(error, self.shown_url + path) from error
        if not _success(response):
            raise _error_from(response, response.content)
        return response

    async def _call(self, method: str, path: str, body: Any = None, params: Mapping[str, Any] | None = None,
                    shape: Shape = ANY_OBJECT) -> dict[str, Any]:
        response = await self._send(method, path, json_body=_json_safe(body), params=params)
        return _shaped(response, _json_of(response), shape)

    async def submit(self, session_id: str, prompt: str | Sequence[Mapping[str, Any]], *,
                     max_tokens: int | None = None, priority: Priority | None = None, tenant: str | None = None,
                     group: str | None = None, params: Mapping[str, Any] | None = None,
                     deadline_ms: int | None = None, on_deadline_miss: str | None = None,
                     callback_url: str | None = None) -> Submitted:
        body = _submit_body(prompt, max_tokens, priority, tenant, group, params, deadline_ms, on_deadline_miss,
                            callback_url)
        return _submitted(await self._call("POST", f"{_session_path(session_id)}/requests", body, shape=SUBMITTED))

    async def request(self, request_id: str, *, include_output: bool = False) -> dict[str, Any]:
        params = {"include": "output"} if include_output else None
        return await self._call("GET", f"/v1/requests/{_quoted(request_id)}", params=params, shape=REQUEST)

    async def cancel(self, request_id: str) -> dict[str, Any]:
        return await self._call("DELETE", f"/v1/requests/{_quoted(request_id)}", shape=REQUEST)

    async def stream(self, *, session_id: str | None = None, request_id: str | None = None, after: int | None = None,
                     reconnect_timeout: float | None = None,
                     on_reconnect: Callable[[Exception, float], None] | None = None) -> AsyncIterator[Event]:
        """As Client.stream()."""
        follow = self._follow(session_id, request_id, after, reconnect_timeout, on_reconnect)
        while not follow.ended:
            try:
                async with aconnect_sse(self.http, "GET", follow.path, headers=follow.headers(),
                                        timeout=self.stream_timeout) as source:
                    response = source.response
                    if response.status_code == 204:  # as in Client.stream
                        return
                    if response.status_code != 200:
                        raise follow.refused(response, await _aerror_body(response))
                    follow.connected()
                    try:
                        async for sse in source.aiter_sse():
                            event = follow.accept(sse)
                            if event is not None:
                                yield event
                                if follow.ended:
                                    return
                    except httpx.DecodingError as error:  # as in Client.stream()
                        raise follow.unreadable(_undecodable(response, error)) from error
                    raise follow.cut_short(response)
            except SSEError as error:  # first, as in Client.stream()
                raise _not_an_event_stream(error) from error
            except (httpx.LocalProtocolError, httpx.UnsupportedProtocol) as error:  # as in Client.stream()
                raise _unreachable(error, self.shown_url + follow.path) from error
            except (_Retry, httpx.TransportError) as error:
                cause = error.error if isinstance(error, _Retry) else error
                await asyncio.sleep(follow.backoff(cause))

    @overload
    async def chat(self, messages: Sequence[Mapping[str, Any]], *, model: str | None = ...,
                   stream: Literal[False] = ..., session_id: str | None = ..., priority: Priority | None = ...,
                   tenant: str | None = ..., group: str | None = ..., max_tokens: int | None = ...,
                   deadline_ms: int | None = ..., callback_url: str | None = ..., **extra: Any) -> dict[str, Any]: ...

    @overload
    async def chat(self, messages: Sequence[Mapping[str, Any]], *, model: str | None = ..., stream: Literal[True],
                   session_id: str | None = ..., priority: Priority | None = ..., tenant: str | None = ...,
                   group: str | None = ..., max_tokens: int | None = ..., deadline_ms: int | None = ...,
                   callback_url: str | None = ..., **extra: Any) -> AsyncChatStream: ...

    async def chat(self, messages: Sequence[Mapping[str, Any]], *, model: str | None = None, stream: bool = False,
                   session_id: str | None = None, priority: Priority | None = None, tenant: str | None = None,
                   group: str | None = None, max_tokens: int | None = None, deadline_ms: int | None = None,
                   callback_url: str | None = None,
                   **extra: Any) -> dict[str, Any] | AsyncChatStream:
        """As Client.chat(); a streamed one is an `AsyncChatStream` (`aclose()` or `async with`)."""
        body, headers = _chat_call(messages, model, stream, session_id, priority, tenant, group, max_tokens,
                                   deadline_ms, callback_url, extra)
        path = "/v1/chat/completions"
        if not stream:
            response = await self._send("POST", path, json_body=body, headers=headers, timeout=self.chat_timeout)
            payload = _json_of(response)
            failed = _body_error(payload, response.headers.get("x-request-id"))
            if failed is not None:
                raise failed
            return _shaped(response, payload, CHAT)
        request = self.http.build_request("POST", path, json=body, headers={**headers, "Accept": "text/event-stream"},
                                          timeout=self.stream_timeout)
        try:
            response = await self.http.send(request, stream=True)
        except httpx.TransportError as error:
            raise _unreachable(error, self.shown_url + path) from error
        if not _success(response):
            try:
                raise _error_from(response, await _aerror_body(response))
            finally:
                await response.aclose()
        return await AsyncChatStream.open(response, self.shown_url + path)

    async def set_quota(self, group: str, *, requests_per_second: float | None = KEEP,
                        tokens_per_second: float | None = KEEP, burst: int | None = KEEP,
                        max_concurrency: int | None = KEEP, burst_tokens: float | None = KEEP,
                        model: str | None = KEEP) -> dict[str, Any]:
        fields = _admin_fields(requests_per_second=requests_per_second, tokens_per_second=tokens_per_second,
                               burst=burst, max_concurrency=max_concurrency, burst_tokens=burst_tokens, model=model)
        return await self._call("PUT", f"/v1/admin/groups/{_quoted(group)}", fields, shape=GROUP)

    async def set_weight(self, tenant: str, weight: float) -> dict[str, Any]:
        return await self._call("PUT", f"/v1/admin/tenants/{_quoted(tenant)}", {"weight": weight}, shape=TENANT)

    async def set_tenant(self, tenant: str, *, weight: float = KEEP, max_priority: Priority | None = KEEP,
                         max_streams: int | None = KEEP, **limits: Any) -> dict[str, Any]:
        fields = _admin_fields(weight=weight, max_priority=max_priority, max_streams=max_streams, **limits)
        return await self._call("PUT", f"/v1/admin/tenants/{_quoted(tenant)}", fields, shape=TENANT)

    async def groups(self) -> list[dict[str, Any]]:
        return (await self._call("GET", "/v1/admin/groups", shape=GROUPS))["groups"]

    async def tenants(self) -> list[dict[str, Any]]:
        return (await self._call("GET", "/v1/admin/tenants", shape=TENANTS))["tenants"]

    async def stats(self) -> dict[str, Any]:
        return await self._call("GET", "/v1/admin/stats", shape=STATS)
