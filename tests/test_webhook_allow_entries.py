"""--webhook-allow entries are compared with a callback URL's host as urlsplit gives it: no brackets, no port,
lower case (sessions/callbacks.py callback_host). An entry that could never match would refuse every callback
to it (422 callback_not_allowed), so it is read as the host it names ([::1] -> ::1) or refused at startup,
naming the entry (sluicegate/settings.py parse_hosts)."""

from __future__ import annotations

import pytest

from sluicegate.sessions.callbacks import callback_allowed
from sluicegate.settings import Settings


def hosts(spec: str) -> list[str]:
    return Settings(webhook_allow=spec, webhook_secret="s").webhook_hosts()


def test_a_bracketed_ipv6_literal_allows_its_callbacks() -> None:
    allowed = hosts("[::1], Hooks.Example.com")
    assert allowed == ["::1", "hooks.example.com"]
    assert callback_allowed("http://[::1]:9000/hook", allowed)
    assert hosts("::1") == ["::1"]  # the bare form, as before


@pytest.mark.parametrize(("entry", "says"), [
    ("hooks.example.com:8443", "has a port"),
    ("127.0.0.1:9000", "has a port"),
    ("[::1]:9000", "has a port"),
    ("hooks.example.com.", "ends with a dot"),
    ("[hooks.example.com]", "not a host name"),
    ("user@hooks.example.com", "not a host name a URL could have"),  # userinfo: the URL's host is after the @
    ("hooks.example.com#x", "not a host name a URL could have"),
    ("%68ooks.example.com", "not a host name a URL could have"),
    ("hooks.example.com\\x", "not a host name a URL could have"),
    ("*.example.com", "no wildcards"),  # was taken as a literal: sub.example.com refused, *.example.com allowed
])
def test_an_entry_that_can_never_match_is_refused_by_name(entry: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as raised:
        hosts(f"127.0.0.1, {entry}")
    assert f"`{entry}`" in str(raised.value)
