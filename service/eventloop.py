"""How lstm-serve's RPC processes run: the event loop (uvloop where it is installed), the
collector settings, and the port file that tells a parent process the bound port.

uvloop (libuv, Cython) makes each asyncio wake-up and cross-thread callback cheaper; gRPC's aio
layer and the engine's answers cross into the loop once per message, so on the one RPC thread
it cut CPU per token-by-token request by ~10-15 % (docs/performance.md). Without it (it is not
built for Windows) the standard loop runs the same code.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from pathlib import Path
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


# A request allocates a few hundred short-lived objects: at the default threshold (700) a young
# collection ran every few requests (~5 % of the RPC thread at 256 sessions).
GC_THRESHOLDS = (20_000, 50, 100)


def settle_gc() -> None:
    """Once started: move everything allocated so far (model, slabs, modules) out of the
    collector's sight, so full collections stay short (they were the p99 tail), and raise the
    young-generation threshold to GC_THRESHOLDS."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def write_port_file(path: str, port: int) -> None:
    """Write the bound port to `path` atomically (a reader never sees a partial file)."""
    tmp = Path(path + ".tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(path)
