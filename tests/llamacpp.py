"""A real inference engine for tests: llama-cpp-python's OpenAI-compatible server, serving the small
seeded llama model of `sluicegate.loadtest.engine_servers` (no download; the benches use it too). Needs the
`engines` extra.

The model, the server launcher and the answer table live in loadtest/engine_servers.py (see its doc for
the trick: greedy decoding walks a fixed successor table, so a prompt ending in an uppercase letter or a
digit gets a known answer and then end-of-sequence). Here: the pytest fixtures `llama_model` (written once
per session) and `llama_server` (one engine per module), and `gate_in_front` (an in-process Sluicegate
stack whose `openai` engine streams from it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sluicegate.loadtest.engine_servers import LlamaServer, write_model


# ---- fixtures --------------------------------------------------------------------------------------
# Import these into a test module to use `llama_model` and `llama_server` (pytest finds them by `name`;
# the function names differ so that the fixture arguments do not shadow the imports).
@pytest.fixture(scope="session", name="llama_model")
def llama_model_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model file, written once per test session (about 55 MB, 1-2 s)."""
    pytest.importorskip("llama_cpp.server.app", reason="needs the engines extra: pip install -e '.[engines]'")
    pytest.importorskip("gguf", reason="needs the engines extra: pip install -e '.[engines]'")
    return write_model(tmp_path_factory.mktemp("llama") / "tiny-llama.gguf")


@pytest.fixture(scope="module", name="llama_server")
def llama_server_fixture(llama_model: Path) -> Iterator[LlamaServer]:
    """One engine per test module (it starts in about a second)."""
    with LlamaServer(llama_model) as server:
        yield server


@contextlib.contextmanager
def gate_in_front(server: LlamaServer, redis_url: str, *, workers: int = 1,
                  **overrides: Any) -> Iterator[Any]:
    """An in-process Sluicegate stack (API, scheduler, `workers` workers of group `default`) whose
    `openai` engine streams from `server`. One try per backend call; the workers probe the engine and
    take its slot count (one); `overrides` change any setting."""
    from tests.helpers import Stack, fast_settings

    settings = fast_settings(redis_url, **{"engine": "openai", "backend_url": server.url,
                                           "backend_model": server.alias, "backend_retries": 1,
                                           "backend_probe": True, "slots": None, **overrides})
    stack = Stack(settings).start(workers=workers)
    try:
        yield stack
    finally:
        stack.stop()
