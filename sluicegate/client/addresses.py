"""Where a call goes, and the caller's credentials it carries: the base URL (checked when the client is
built, since one httpx cannot send to would fail every call as if sent), the paths that name a session, a
request, a tenant or a group (`.` and `..` kept names, not dot segments), and the API key (refused when no
header can carry it, without naming it)."""

from __future__ import annotations

import re
from urllib.parse import quote

import httpx

from sluicegate.client.errors import InvalidArgument, SluicegateError
from sluicegate.client.shown_urls import _authority_end, _outline, _shown_url

DEFAULT_URL = "http://127.0.0.1:8000"


def _base_url(url: str) -> str:
    """`url` without its trailing `/`, or InvalidArgument for one httpx cannot send to: with no http(s)
    scheme (`localhost:8000`) or no host, every call would fail as if sent (`no_answer`, and a stream
    would retry it for its whole reconnect_timeout) though nothing can ever be sent. No message quotes
    more of a URL that does not parse, or has an `@` past its userinfo, than its scheme and host: httpx's own
    message (`Invalid port: 'hunter2'`) or the whole text would name a password with `/`, `?` or `#` in it."""
    _, sep, rest = url.partition("://")
    after = rest if sep else url
    if "@" in after[_authority_end(after):]:
        # `http://alice:pa/ss@host`: httpx ends the userinfo's authority at the `/` (host `alice`, port `pa`)
        raise InvalidArgument(422, "invalid_request", f"url {_outline(url)!r}: an @ past the end of its host "
                              "(a / ? or # ends it): a password with / ? # or @ in it must be percent-encoded (%2F "
                              "%3F %23 %40)")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as error:  # its message quotes the part it refused, which may be the password
        fault = re.split(r": |, ", str(error), maxsplit=1)[0]  # what is wrong, before what it quotes
        raise InvalidArgument(422, "invalid_request", f"url {_outline(url)!r}: does not parse ({fault})") from None
    shown = _shown_url(url)
    if parsed.scheme not in ("http", "https"):
        hint = "http://" + shown.split("://", 1)[-1]
        raise InvalidArgument(422, "invalid_request", f"url {shown!r}: not an http:// or https:// URL (did you "
                              f"mean {hint!r}?)")
    if not parsed.host:
        raise InvalidArgument(422, "invalid_request", f"url {shown!r}: no host (e.g. {DEFAULT_URL!r})")
    return url.rstrip("/")


def _header_fault(c: str) -> str | None:
    """What `c` is when a header value cannot carry it (RFC 9110's field-vchar, with a space or tab between):
    a control character (U+0000-U+001F but a tab, and U+007F DEL) or a non-ASCII one (httpx writes headers as
    ASCII). h11 refuses only a NUL, a line end, a vertical tab and a form feed; the rest (`\x01`, `\x1b`,
    `\x7f`) it writes, for the server or a proxy to refuse or mangle."""
    if not c.isascii():
        return "a non-ASCII character"
    if c in "\r\n":
        return "a line end"
    if c == "\0":
        return "a NUL"
    if c in "\x0b\x0c":
        return "a vertical tab or form feed"
    if (c < " " and c != "\t") or c == "\x7f":
        return f"a control character (U+{ord(c):04X})"
    return None


def _api_key(key: str | None) -> str | None:
    """`key`, or InvalidArgument for one an HTTP header cannot carry: a line end (pasted with it, or read from a
    file with its newline), a NUL or any other control character (DEL too, and those h11 would write), a space
    or tab at either end, or a non-ASCII character (httpx writes headers as ASCII). h11 would refuse a line end
    with a message that quotes the key, on every call and every reconnect; the message here does not quote it.
    A space or tab inside is carried: a passphrase (`correct horse battery staple`) is a key the server takes."""
    if not key:
        return key
    faults = [(i, fault) for i, c in enumerate(key) if (fault := _header_fault(c)) is not None]
    if key[0] in " \t":
        faults.append((0, "a space or tab at its start"))
    if key[-1] in " \t":
        faults.append((len(key) - 1, "a space or tab at its end"))
    if not faults:
        return key
    where, what = min(faults, key=lambda fault: fault[0])
    raise InvalidArgument(422, "invalid_request", f"the API key (--api-key / SLUICEGATE_API_KEY) has a character "
                          f"a header cannot carry at position {where} of {len(key)}: {what} (a space inside is "
                          "carried; a line end, a control character, a non-ASCII character or a space at either "
                          "end is not)")


def _quoted(value: str) -> str:
    """`value` as one path segment. "." and ".." are names the server accepts (a session, a tenant, a group),
    but as segments they are dot segments, which httpx removes as any URL resolver does (`/v1/sessions/..`
    would reach `/v1`): `%2E` keeps them a name, and the server decodes it before it routes."""
    if value in (".", ".."):
        return "%2E" * len(value)
    return quote(value, safe="")


def _session_path(session_id: str) -> str:
    """`/v1/sessions/<id>`. An id with `/` would reach no route (the server decodes `%2F` before it
    routes: a 404 "no such endpoint"): refused here as the server refuses every other bad id."""
    if "/" in session_id:
        raise SluicegateError(422, "invalid_request", "session_id: 1-128 characters of A-Z a-z 0-9 . _ : @ -")
    return f"/v1/sessions/{_quoted(session_id)}"
