"""Python client for the Sluicegate HTTP API: `Client` (sync) and `AsyncClient` (asyncio), on httpx.

    from sluicegate.client import Client

    with Client() as sg:                      # SLUICEGATE_URL, SLUICEGATE_API_KEY
        sub = sg.submit("chat-42", "Tell me about sluice gates", max_tokens=40, priority="high")
        for event in sg.stream(request_id=sub.request_id):
            if event.event == "token":
                print(event.text, end="", flush=True)

`stream()` is the point of a client: generation never depends on the connection, so a dropped
connection or a restarted API is a reconnect with `Last-Event-ID`, not an error. It retries
transport errors, 5xx and bodies that do not decode (`bad_encoding`: a proxy's Content-Encoding on a plain
body) with a bounded, jittered backoff and gives up (`StreamUnavailable`) after
`reconnect_timeout` seconds without a connection (a 200 whose body does not decode, or is empty, is none);
a 4xx is the caller's problem and is raised at
once (`CursorExpired` when the session's log no longer holds the cursor). Every error the API
answers is a `SluicegateError` carrying its status and the `type`/`code` of the JSON error body; an
argument refused before sending (a number JSON cannot carry: nan, inf; a base URL that is not http(s) or does
not parse, or an API key that no header can carry, refused when the client is built) is an `InvalidArgument`, both a
`SluicegateError` and a `ValueError`. A 3xx is an error as a 4xx is (redirects are not followed), and a 2xx
that is not what the route answers (a catch-all's `{"ok": true}`, a list, no body) is `not_the_api`. No
message names the API key or the password of a URL's userinfo.

A non-streamed `chat()` waits for its answer as long as its request takes (nothing is written before it;
`chat_timeout` bounds the wait). A streamed one is a `ChatStream` that owns its connection (read it to its
end, close it, or use `with`) and carries `request_id` and `session_id`, to follow with `stream()`.

Its modules, one job each: errors.py (the exceptions, and an error built from an answer or a failure),
answers.py (a success's JSON decoded and shape-checked; events, chat chunks, `Event`, `Submitted`), bodies.py
(what a call sends), addresses.py (the base URL, a name's path, the API key check), shown_urls.py (a URL as a
message may name it: no password), follow.py (an event stream's resume and retry budget), base.py (what both
clients share), sync_client.py (`Client`, `ChatStream`) and async_client.py (`AsyncClient`,
`AsyncChatStream`). This package talks HTTP only: it must not import the server's packages (sluicegate.api
and friends).
"""

from __future__ import annotations

from sluicegate.client.addresses import DEFAULT_URL
from sluicegate.client.answers import TERMINAL, Event, Submitted
from sluicegate.client.async_client import AsyncChatStream, AsyncClient
from sluicegate.client.bodies import KEEP, Priority
from sluicegate.client.errors import CursorExpired, InvalidArgument, SluicegateError, StreamUnavailable
from sluicegate.client.sync_client import ChatStream, Client

__all__ = ["DEFAULT_URL", "KEEP", "TERMINAL", "AsyncChatStream", "AsyncClient", "ChatStream", "Client", "CursorExpired",
           "Event", "InvalidArgument", "Priority", "SluicegateError", "StreamUnavailable", "Submitted"]
