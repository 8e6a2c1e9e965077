"""A number JSON cannot carry (nan, inf) given to the client library: refused before anything is sent as
an `InvalidArgument`, a `SluicegateError` (what a caller of the library catches) that names the field,
and still a `ValueError` (what callers caught before). The commands make it a usage error (exit 2).

No server is needed: nothing listens on the URL, so a call that went out would be `unreachable`."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sluicegate import cli, client_cli
from sluicegate.client import AsyncClient, Client, SluicegateError
from sluicegate.embedded import free_port

NAN, INF = math.nan, math.inf


@pytest.fixture
def client() -> Iterator[Client]:
    with Client(f"http://127.0.0.1:{free_port()}") as sg:
        yield sg


CALLS: list[tuple[str, Callable[[Client], Any]]] = [
    ("weight", lambda sg: sg.set_weight("acme", NAN)),
    ("weight", lambda sg: sg.set_tenant("acme", weight=-INF)),
    ("requests_per_second", lambda sg: sg.set_quota("default", requests_per_second=INF)),
    ("burst_tokens", lambda sg: sg.set_quota("default", tokens_per_second=5, burst_tokens=NAN)),
    ("params.temperature", lambda sg: sg.submit("s1", "hi", params={"temperature": NAN})),
    ("temperature", lambda sg: sg.chat([{"role": "user", "content": "hi"}], temperature=INF)),
    ("logit_bias.42", lambda sg: sg.chat([{"role": "user", "content": "hi"}], stream=True, logit_bias={42: NAN})),
]


@pytest.mark.parametrize(("field", "send"), CALLS, ids=[f"{n}-{field}" for n, (field, _) in enumerate(CALLS)])
def test_a_number_json_cannot_carry_is_a_sluicegate_error_naming_its_field(
        client: Client, field: str, send: Callable[[Client], Any]) -> None:
    with pytest.raises(SluicegateError) as refused:
        send(client)
    error = refused.value
    assert (error.status, error.code) == (422, "invalid_request"), error  # not `unreachable`: never sent
    assert error.message.startswith(f"{field}: a finite number"), error.message
    assert isinstance(error, ValueError)  # callers that caught the ValueError it was still catch it


def test_finite_numbers_are_sent(client: Client) -> None:
    """The check refuses only nan and inf: a finite weight goes out (here to nothing: `unreachable`)."""
    with pytest.raises(SluicegateError) as failed:
        client.set_weight("acme", 1e308)
    assert failed.value.code == "unreachable"


def test_the_async_client_refuses_it_alike() -> None:
    async def main() -> None:
        async with AsyncClient(f"http://127.0.0.1:{free_port()}") as sg:
            with pytest.raises(SluicegateError, match="weight: a finite number"):
                await sg.set_weight("acme", INF)
            with pytest.raises(SluicegateError, match=r"messages\[0\]\.score: a finite number"):
                await sg.chat([{"role": "user", "content": "hi", "score": NAN}])

    asyncio.run(main())


def test_the_commands_make_it_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse refuses nan and inf given as text (tests/test_client_failures.py); a value that reaches
    the library anyway is still a usage error (exit 2) that names the field, not a refusal (exit 1)."""
    args = cli.build_parser().parse_args(["quota", "default", "--burst", "3", "--url", f"http://127.0.0.1:{free_port()}"])
    args.requests_per_second = NAN
    assert client_cli.run(args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "requests_per_second: a finite number" in err, err
