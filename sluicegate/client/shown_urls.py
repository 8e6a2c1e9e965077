"""What a message may name of a URL: never the password of its userinfo (`http://bob:secret@host`, sent as
Basic auth), since messages end up on terminals, in logs and in an assistant's context. A module of its own
because errors.py names a redirect's Location with it and addresses.py, which raises errors.py's
InvalidArgument, names a refused base URL with it."""

from __future__ import annotations

import re


def _authority_end(rest: str) -> int:
    """Where the authority of `rest` (a URL past its `scheme://`) ends: its first `/`, `?` or `#`, as httpx
    parses it."""
    return min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))


def _outline(url: str) -> str:
    """A URL refused before it parsed, as its message may name it: its scheme and the host after its last `@`,
    nothing else (`http://...@127.0.0.1:9`)."""
    scheme, sep, rest = url.partition("://")
    shown_scheme = "" if not sep else f"{scheme}://" if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme) else "...://"
    tail = (rest if sep else url).rsplit("@", 1)
    host = tail[-1][:_authority_end(tail[-1])]
    return f"{shown_scheme}{'...@' if len(tail) > 1 else ''}{host}"


def _shown_url(url: str) -> str:
    """`url` as a message may name it: its userinfo (`http://bob:secret@host`, sent as Basic auth) left out,
    since messages end up on terminals, in logs and in an assistant's context."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    end = _authority_end(rest)
    authority = rest[:end]
    if "@" not in authority:
        return url
    return f"{scheme}{sep}{authority.rsplit('@', 1)[1]}{rest[end:]}"
