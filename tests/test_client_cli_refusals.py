"""The client commands refuse what can never work, at once and in one line, instead of waiting for it:
a `--url` with no http(s) scheme or no host (exit 2, not a `no_answer` or 300 s of reconnects), a 404 that
is not the API's "no session" answer (`tail` exits 1 instead of waiting for ever), and a `stats --watch
--interval` under 0.1 s (exit 2 before anything is sent)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.client_helpers import html_page, serving
from tests.helpers import Stack, run_sluicegate


def sg(*args: str, env: dict[str, str] | None = None, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return run_sluicegate(*args, env=env, timeout=timeout)


# Another HTTP server's 404: an HTML page for every path. Counts the requests it got.
NotFoundPage = html_page(404, b"<html><head><title>404 Not Found</title></head>"
                                b"<body><h1>Not Found</h1></body></html>\n")


@pytest.fixture
def other_server() -> Iterator[str]:
    NotFoundPage.hits = 0
    with serving(NotFoundPage) as url:
        yield url


@pytest.mark.parametrize(("args", "url"), [
    (("submit", "s1", "hi"), "localhost:8000"),  # was "sent, but no answer came ... may have taken effect", exit 1
    (("submit", "s1", "hi", "--follow", "--reconnect-timeout", "1"), "127.0.0.1:8000"),
    (("tail", "s1", "--reconnect-timeout", "1"), "localhost:8000"),  # was retried for the whole reconnect timeout
    (("stats",), "ftp://127.0.0.1:8000"),
    (("quota", "default"), "http://"),  # no host
])
def test_a_url_that_is_not_http_is_a_usage_error(args: tuple[str, ...], url: str) -> None:
    for result in (sg(*args, "--url", url), sg(*args, env={"SLUICEGATE_URL": url})):
        assert result.returncode == 2, result.stderr
        assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
        assert "cannot send this" in result.stderr and "http://" in result.stderr, result.stderr


def test_tail_of_another_servers_404_page_exits_1(other_server: str) -> None:
    result = sg("tail", "s1", "--url", other_server, timeout=15)  # the old code waited for ever: TimeoutExpired
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "waiting for it" not in result.stderr, result.stderr
    assert result.stderr.startswith("sluicegate tail: 404 not_found: ") and "Not Found" in result.stderr


def test_tail_of_a_wrong_route_of_the_api_exits_1(stack: Stack) -> None:
    """The API's own 404 for a path it has no route for ("no such endpoint") is no session to wait for."""
    result = sg("tail", "s1", "--url", stack.base_url + "/sluicegate", timeout=15)
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "no such endpoint" in result.stderr, result.stderr


@pytest.mark.parametrize("interval", ["0", "-1", "0.05"])
def test_stats_watch_refuses_an_interval_under_a_tenth_of_a_second(other_server: str, interval: str) -> None:
    result = sg("stats", "--watch", "--json", f"--interval={interval}", "--url", other_server, timeout=10)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert "argument --interval: at least 0.1 seconds" in result.stderr, result.stderr
    assert NotFoundPage.hits == 0  # refused before anything was sent
