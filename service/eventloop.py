"""The event loop the server and the load generator run on: uvloop where it is installed.

uvloop (libuv, Cython) makes each asyncio wake-up and cross-thread callback cheaper; gRPC's aio
layer and the engine's answers cross into the loop once per message, so on the one RPC thread
it cut CPU per token-by-token request by ~10-15 % (docs/performance.md). Without it (it is not
built for Windows) the standard loop runs the same code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main), on uvloop where installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - installed on every platform the project ships for
        return asyncio.run(main)
    return uvloop.run(main)


def loop_name() -> str:
    """'uvloop' or 'asyncio': which loop runs the calling coroutine."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
