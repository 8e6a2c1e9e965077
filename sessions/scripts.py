"""Load the Lua scripts: each file in lua/ gets common.lua prepended and is registered once."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from sessions.keys import BUCKETS

LUA_DIR = Path(__file__).parent / "lua"
SCRIPT_NAMES = ("submit", "append", "finish", "handback", "cancel", "heartbeat", "register_worker",
                "sweep", "read_log")


@cache
def script_source(name: str) -> str:
    common = (LUA_DIR / "common.lua").read_text()
    common = common.replace("{{BUCKETS}}", ", ".join(repr(b) for b in BUCKETS))
    return common + "\n" + (LUA_DIR / f"{name}.lua").read_text()


class Scripts:
    """The registered scripts for one Redis client (sync or asyncio): `scripts.submit(keys, args)`."""

    def __init__(self, client: Any) -> None:
        for name in SCRIPT_NAMES:
            setattr(self, name, client.register_script(script_source(name)))

    submit: Any
    append: Any
    finish: Any
    handback: Any
    cancel: Any
    heartbeat: Any
    register_worker: Any
    sweep: Any
    read_log: Any
