"""Shared fixtures: tiny real checkpoints and real servers on 127.0.0.1, port 0.

Each server runs on its own event loop in a background thread, so sync tests (the sync
client) and async tests (their own loop) can both talk to it over a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import service  # noqa: F401  (first: the tests run on the gRPC socket layer lstm-serve chooses)
from model.checkpoint import save_checkpoint
from model.model import CharRNN, ModelConfig
from model.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "tinyshakespeare.txt"


def offline_logprobs(ckpt: Any, tokens: list[int]) -> np.ndarray:
    """The log-softmax of an offline forward over the whole input: what serving must match."""
    with torch.no_grad():
        logits, _ = ckpt.model(torch.tensor([tokens]))
        return torch.log_softmax(logits[0].float(), dim=-1).numpy()


def logprobs_of(responses: Any) -> np.ndarray:
    """The full log-probs of every output of some StepResponses, in order."""
    return np.array([list(o.logprobs) for r in responses for o in r.outputs], dtype=np.float32)


def corpus_text() -> str:
    return CORPUS.read_text(encoding="utf-8")


def make_checkpoint(directory: Path, *, cell_type: str = "lstm", hidden: int = 32, layers: int = 2,
                    embedding: int = 16, seed: int = 0) -> Path:
    """A small random-weight checkpoint whose vocabulary is the corpus's characters."""
    tokenizer = CharTokenizer.from_text(corpus_text())
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=len(tokenizer), embedding_size=embedding, hidden_size=hidden,
                         num_layers=layers, cell_type=cell_type)  # type: ignore[arg-type]
    model = CharRNN(config)
    # Larger than default init so outputs depend strongly on the state (a sharper test).
    with torch.no_grad():
        for p in model.rnn.parameters():
            p.uniform_(-0.5, 0.5)
    save_checkpoint(directory, model, tokenizer, {"best_val_loss": 4.0, "note": "random weights for tests"})
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_gru_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-gru", cell_type="gru")


@dataclass
class RunningServer:
    target: str  # "127.0.0.1:PORT" of the gRPC server
    port: int
    metrics_port: int | None  # the /metrics HTTP port
    server: Any  # service.server.LstmServer
    loop: asyncio.AbstractEventLoop  # the server's event loop (in its own thread)
    checkpoint: Path

    @property
    def engine(self) -> Any:
        return self.server.engine

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the server's loop (e.g. to inspect or stop it)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a server's real /metrics endpoint, by (name, sorted labels)."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@contextlib.contextmanager
def run_server(checkpoint: Path, **overrides: Any) -> Iterator[RunningServer]:
    from service.config import ServerConfig
    from service.server import create_server

    config = dataclasses.replace(
        ServerConfig(), checkpoint=str(checkpoint), host="127.0.0.1", port=0, metrics_port=0,
        grace_seconds=2.0, **{"durability": "none", **overrides},
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-server-loop", daemon=True)
    thread.start()

    async def start() -> tuple[Any, int]:
        server, port = await create_server(config)
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
    running = RunningServer(f"127.0.0.1:{port}", port, server.metrics_port, server, loop, checkpoint)
    try:
        yield running
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace=1.0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[RunningServer]:
    """A real lstm-serve on 127.0.0.1 (port 0) serving the tiny random checkpoint."""
    with run_server(tiny_checkpoint) as running:
        yield running
