"""End-to-end tests of the Python client (sync and asyncio) and of ``lstm-client`` against a
real lstm-serve (the ``server`` fixture of conftest.py: a tiny random-weight checkpoint
whose vocabulary is the characters of data/tinyshakespeare.txt)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from lstmserve_client import (
    AlreadyExists,
    AsyncClient,
    AsyncSession,
    Cancelled,
    Client,
    DeadlineExceeded,
    InvalidInput,
    PositionConflict,
    ResourceExhausted,
    RetryPolicy,
    Session,
    SessionNotFound,
    StepResult,
    Unavailable,
    cli,
)

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "tinyshakespeare.txt"
CLIENT_SRC = ROOT / "clients" / "python"
STEP = "/lstmserve.v1.LstmService/Step"
CREATE = "/lstmserve.v1.LstmService/CreateSession"
DELETE = "/lstmserve.v1.LstmService/DeleteSession"
FORK = "/lstmserve.v1.LstmService/ForkSession"


@pytest.fixture(scope="module")
def corpus() -> str:
    return CORPUS.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def vocab(corpus: str) -> list[str]:
    return sorted(set(corpus))


@pytest.fixture
def client(server: Any) -> Iterator[Client]:
    with Client(server.target, timeout=30) as c:
        yield c


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def assert_same_outputs(a: StepResult, b: StepResult) -> None:
    assert [o.token for o in a.outputs] == [o.token for o in b.outputs]
    for x, y in zip(a.outputs, b.outputs, strict=True):
        assert x.top_tokens == y.top_tokens
        assert x.top_logprobs == pytest.approx(y.top_logprobs, abs=1e-4)


def _method(details: Any) -> str:
    m = details.method
    return m.decode() if isinstance(m, bytes) else str(m)


class LostResponse(grpc.RpcError, grpc.Call):  # type: ignore[misc,unused-ignore]
    """UNAVAILABLE raised to the caller although the server did answer."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "simulated lost response"

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def initial_metadata(self) -> tuple[()]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


class LoseResponses(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc,unused-ignore]
    """Lets the first ``count`` calls of ``method`` reach the server and complete there,
    then tells the caller the connection broke (UNAVAILABLE)."""

    def __init__(self, method: str, count: int = 1) -> None:
        self.method = method
        self.remaining = count
        self.calls = 0

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        outcome = continuation(client_call_details, request)
        if _method(client_call_details) == self.method:
            self.calls += 1
            if self.remaining > 0:
                self.remaining -= 1
                try:
                    outcome.result()  # the server has run it
                except grpc.RpcError:
                    pass
                raise LostResponse()
        return outcome


class AioLoseResponses(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc,unused-ignore]
    def __init__(self, method: str, count: int = 1) -> None:
        self.method = method
        self.remaining = count
        self.calls = 0

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        call = await continuation(client_call_details, request)
        if _method(client_call_details) == self.method:
            self.calls += 1
            if self.remaining > 0:
                self.remaining -= 1
                try:
                    await call
                except grpc.RpcError:
                    pass
                raise grpc.aio.AioRpcError(
                    code=grpc.StatusCode.UNAVAILABLE,
                    initial_metadata=grpc.aio.Metadata(),
                    trailing_metadata=grpc.aio.Metadata(),
                    details="simulated lost response",
                )
        return call


FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)


# =========================================================================== sync client


def test_model_info(client: Client, vocab: list[str]) -> None:
    info = client.model_info()
    assert info.vocab == vocab
    assert info.cell_type == "lstm"
    assert (info.num_layers, info.hidden_size, info.embedding_size) == (2, 32, 16)
    assert len(info.checkpoint_sha256) == 64 and int(info.checkpoint_sha256, 16) >= 0
    assert info.device in ("cpu", "cuda") and info.dtype == "float32"
    assert info.limits.max_tokens_per_request > 0 and info.limits.max_sessions > 0
    assert info.server_version
    assert math.isfinite(info.val_loss)


def test_step_outputs(client: Client, vocab: list[str]) -> None:
    with client.session() as s:
        assert s.position == 0 and len(s.session_id) == 22
        r = s.step("First")
        assert r.session_id == s.session_id and r.position == 5 and s.position == 5
        assert r.text == "First" and [o.token for o in r.outputs] == [vocab.index(ch) for ch in "First"]
        for o in r.outputs:
            assert len(o.top_tokens) == 5 and o.top_texts == [vocab[t] for t in o.top_tokens]
            assert o.top_logprobs == sorted(o.top_logprobs, reverse=True)
            assert all(lp <= 0 for lp in o.top_logprobs)
            assert o.logprobs is None and o.hidden is None
        r = s.step([vocab.index(" "), vocab.index("C")], top_k=0, return_logprobs=True, return_hidden=True)
        assert r.position == 7 and r.text == " C"
        for o in r.outputs:
            assert o.top_tokens == [] and o.top_texts == []
            assert o.logprobs is not None and len(o.logprobs) == len(vocab)
            assert math.log(sum(math.exp(x) for x in o.logprobs)) == pytest.approx(0.0, abs=1e-4)
            assert o.hidden is not None and len(o.hidden) == 32
        r = s.step("i", top_k=3, return_logprobs=True)
        o = r.outputs[0]
        assert o.logprobs is not None
        assert o.top_tokens == sorted(range(len(vocab)), key=lambda t: -o.logprobs[t])[:3]  # type: ignore[index]
        assert s.info().position == 8


def test_text_and_tokens_and_chunking_agree(client: Client, vocab: list[str]) -> None:
    text = "ROMEO: hello"
    with client.session() as a, client.session() as b, client.session() as c:
        ra = a.step(text)
        rb = b.step([vocab.index(ch) for ch in text])
        rc1 = c.step(text[:5])
        rc2 = c.step(text[5:])
        assert_same_outputs(ra, rb)
        assert_same_outputs(ra, StepResult(c.session_id, c.position, rc1.outputs + rc2.outputs))


def test_context_manager_and_keep(client: Client) -> None:
    with client.session() as s:
        sid = s.session_id
    assert s.deleted
    with pytest.raises(SessionNotFound):
        client.attach(sid)
    with client.session(keep=True) as s:
        s.step("ab")
    kept = client.attach(s.session_id)
    assert kept.position == 2 and kept.kept
    with client.session() as s2:
        s2.keep()
    again = client.attach(s2.session_id, keep=False)
    with again:
        pass
    with pytest.raises(SessionNotFound):
        client.attach(s2.session_id)
    kept.delete()
    # An exception inside the block still deletes the session, and is not masked.
    with pytest.raises(RuntimeError), client.session() as s3:
        raise RuntimeError("boom")
    with pytest.raises(SessionNotFound):
        client.attach(s3.session_id)


def test_proposed_id_and_ttl(client: Client) -> None:
    sid = "my-own-session-id-0123456789"
    with client.session(ttl=60, session_id=sid) as s:
        assert s.session_id == sid
        info = s.info()
        assert info.session_id == sid and info.ttl_seconds == 60 and info.position == 0
        assert info.create_time is not None and info.expire_time is not None
        assert info.expire_time > info.create_time
        with pytest.raises(AlreadyExists):
            client.session(session_id=sid)


def test_stream(client: Client) -> None:
    pieces: list[str | list[int]] = ["Fir", "st Cit", "izen:\n", [0, 1]]
    with client.session() as s, client.session() as ref:
        results = list(s.stream(pieces, top_k=3))
        assert [r.position for r in results] == [3, 9, 15, 17]
        assert s.position == 17
        for piece, r in zip(pieces, results, strict=True):
            assert_same_outputs(r, ref.step(piece, top_k=3))
        # expected_position was tracked locally: the next step agrees with the server.
        assert s.step("x").position == 18


def test_stream_from_a_live_generator(client: Client) -> None:
    def live() -> Iterator[str]:
        for ch in "To be, or not":
            time.sleep(0.002)
            yield ch

    with client.session() as s:
        got = [r.text for r in s.stream(live(), top_k=0)]
        assert "".join(got) == "To be, or not" and s.position == 13


def test_stream_input_errors(client: Client) -> None:
    class Boom(Exception):
        pass

    def inputs() -> Iterator[str]:
        yield "ab"
        yield "cd"
        raise Boom("source failed")

    with client.session() as s:
        seen = []
        with pytest.raises(Boom):
            for r in s.stream(inputs()):
                seen.append(r.position)
        assert seen == [2, 4] and s.position == 4
        # A bad element (bytes) fails locally the same way.
        with pytest.raises(TypeError):
            list(s.stream(["ef", b"gh"]))
        assert s.position == 6
        # A server-side refusal ends the stream with the mapped error; earlier inputs stand.
        with pytest.raises(InvalidInput):
            list(s.stream(["gh", "\u00e9t\u00e9", "ij"]))
        assert s.position == 8
        assert s.info().position == 8
        assert s.step("k").position == 9


def test_stream_break_resyncs_position(client: Client) -> None:
    with client.session() as s:
        it = s.stream(["a"] * 50, top_k=0)
        next(it)
        it.close()  # cancels; some pipelined inputs may have run
        r = s.step("b")  # the position is re-read first: no PositionConflict
        assert r.position == s.info().position


def test_generate(client: Client, vocab: list[str]) -> None:
    with client.session() as s:
        toks = list(s.generate("ROMEO:", max_tokens=20, temperature=0.8, seed=1))
        assert len(toks) == 20
        assert [t.position for t in toks] == list(range(7, 27))
        assert all(t.finish_reason is None for t in toks[:-1]) and toks[-1].finish_reason == "length"
        assert all(t.text == vocab[t.token] and t.logprob <= 0 for t in toks)
        assert s.position == 26 and s.info().position == 26
        text = s.generate_text(max_tokens=5, temperature=0)
        assert len(text) == 5 and s.position == 31


def test_generate_is_reproducible_with_a_seed(client: Client) -> None:
    with client.session() as s:
        s.step("HAMLET:")
        with s.fork() as a, s.fork() as b:
            assert a.generate_text(max_tokens=30, seed=7) == b.generate_text(max_tokens=30, seed=7)
    with client.session() as s:
        r = s.step("HAMLET:", top_k=1)
        # Greedy (temperature 0) picks the argmax of the last step output.
        tok = next(iter(s.generate(max_tokens=1, temperature=0)))
        assert tok.token == r.outputs[-1].top_tokens[0] and tok.position == 8


def test_generate_stop(client: Client) -> None:
    with client.session() as s:
        first = s.step("a", top_k=1).outputs[0].top_texts[0]  # what greedy sampling picks next
        toks = list(s.generate(max_tokens=50, temperature=0, stop=[first]))
        assert len(toks) == 1 and toks[0].text == first and toks[0].finish_reason == "stop"
        assert s.position == 2
        toks = list(s.generate(max_tokens=50, temperature=0, stop=["never"]))
        assert len(toks) == 50 and toks[-1].finish_reason == "length"


def test_generate_break_resyncs_position(client: Client) -> None:
    with client.session() as s:
        gen = s.generate("x", max_tokens=2000)
        for i, _ in enumerate(gen):
            if i == 2:
                break
        gen.close()
        time.sleep(0.2)
        r = s.step("y")
        assert r.position == s.info().position


def test_generate_on_a_fork_then_step_the_kept_text(client: Client) -> None:
    """The documented pattern for stopping a generation early with the session holding exactly
    what was read (the server runs ahead of a slow reader and applies all it sampled)."""
    with client.session() as s, client.session() as reference:
        s.step("ROMEO:")
        draft = s.fork()
        kept = []
        for token in draft.generate(max_tokens=2000, temperature=0.8, seed=3):
            kept.append(token.text)
            if len(kept) == 5:
                time.sleep(0.3)  # the server has sampled well past what was read by now
                break
        assert draft.info().position > 6 + 5
        draft.delete()
        s.step("".join(kept))
        assert s.position == 6 + 5 == s.info().position
        expected = reference.step("ROMEO:" + "".join(kept), top_k=5)
        assert_same_outputs(s.step(" ", top_k=5), reference.step(" ", top_k=5))
        assert expected.position == 11


def test_a_stop_string_the_model_cannot_write_is_refused(client: Client) -> None:
    with client.session() as s:
        with pytest.raises(InvalidInput, match=r"stop\[1\] can never occur.*U\+2019"):
            list(s.generate(max_tokens=5, stop=["a", "it\u2019s"]))
        assert s.info().position == 0  # refused before anything ran


def test_fork_reset_delete(client: Client) -> None:
    with client.session() as s:
        s.step("KING RICHARD")
        with s.fork(ttl=120) as f:
            assert f.session_id != s.session_id and f.position == s.position == 12
            assert f.info().ttl_seconds == 120
            assert_same_outputs(s.step(" III"), f.step(" III"))
            f.step("more")
            assert s.position == 16 and f.position == 20
        s.reset()
        assert s.position == 0 and s.info().position == 0
        with client.session() as fresh:
            assert_same_outputs(s.step("KING"), fresh.step("KING"))
        s.delete()
        assert s.deleted
        with pytest.raises(SessionNotFound):
            s.delete()
        with pytest.raises(SessionNotFound):
            s.step("a")
        with pytest.raises(SessionNotFound):
            s.fork()


def test_attach_and_position_conflict(client: Client) -> None:
    with client.session() as s:
        s.step("abc")
        other = client.attach(s.session_id)
        assert other.position == 3 and other.kept
        other.step("de")
        with pytest.raises(PositionConflict) as info:
            s.step("f")
        assert info.value.current_position == 5
        assert info.value.code == "ABORTED" and "5" in info.value.details
        assert s.position == 3  # nothing applied, nothing assumed
        s.info()
        assert s.step("f").position == 6
        with pytest.raises(PositionConflict):
            list(other.generate(max_tokens=2))
        with pytest.raises(PositionConflict):
            list(other.stream(["g"]))


# --------------------------------------------------------------------------- errors


def test_not_found(client: Client) -> None:
    with pytest.raises(SessionNotFound) as info:
        client.attach("no-such-session-0123456789")
    assert info.value.code == "NOT_FOUND" and info.value.details
    ghost = Session(client, "no-such-session-0123456789", 0)
    for call in (lambda: ghost.step("a"), ghost.reset, ghost.delete, ghost.fork, lambda: list(ghost.generate())):
        with pytest.raises(SessionNotFound):
            call()


def test_invalid_input(client: Client, vocab: list[str]) -> None:
    with client.session() as s:
        for bad in ("caf\u00e9", [len(vocab)], "", []):
            with pytest.raises(InvalidInput) as info:
                s.step(bad)
            assert info.value.code == "INVALID_ARGUMENT" and info.value.details
        with pytest.raises(InvalidInput, match="U\\+00E9|\u00e9"):
            s.step("caf\u00e9")
        with pytest.raises(InvalidInput):
            list(s.generate("\u00e9"))
        assert s.position == 0 and s.info().position == 0
        with pytest.raises(InvalidInput):
            client.session(session_id="short")
        with pytest.raises(InvalidInput):
            client.session(ttl=10**9)
        limit = client.model_info().limits.max_tokens_per_request
        with pytest.raises(InvalidInput):
            s.step("a" * (limit + 1))


def test_unavailable_on_a_closed_port() -> None:
    started = time.monotonic()
    with Client(f"127.0.0.1:{closed_port()}", timeout=2, retries=FAST_RETRY) as c:
        with pytest.raises(Unavailable) as info:
            c.model_info()
        assert info.value.code == "UNAVAILABLE"
        with pytest.raises(Unavailable):
            c.session()
    assert time.monotonic() - started < 10


def test_deadline_exceeded(client: Client) -> None:
    with client.session() as s:
        with pytest.raises(DeadlineExceeded):
            s.generate_text(max_tokens=4000, timeout=0.05)
        # The generation may have run partly: the position is re-read before the next step.
        r = s.step("a")
        assert r.position == s.info().position


def test_resource_exhausted(tiny_checkpoint: Path) -> None:
    from tests.conftest import run_server

    with run_server(tiny_checkpoint, max_sessions=1) as srv, Client(srv.target, timeout=10) as c:
        with c.session():
            with pytest.raises(ResourceExhausted) as info:
                c.session()
            assert info.value.code == "RESOURCE_EXHAUSTED"
            assert info.value.retry_after is None or info.value.retry_after >= 0


def test_cancelled_when_closed_mid_session(server: Any) -> None:
    c = Client(server.target)
    s = c.session(keep=True)
    c.close()
    with pytest.raises(Cancelled):
        s.step("a")


# --------------------------------------------------------------------------- retries


def test_lost_step_response_is_replayed_not_reapplied(server: Any) -> None:
    lossy = LoseResponses(STEP)
    with Client(server.target, retries=FAST_RETRY) as plain, plain.session() as ref:
        with Client(server.target, retries=FAST_RETRY, interceptors=[lossy]) as c, c.session() as s:
            s.step("Hel")
            ref.step("Hel")
            lossy.remaining = 1
            calls = lossy.calls
            got = s.step("lo, w")  # reaches the server, "lost", retried
            want = ref.step("lo, w")
            assert lossy.calls == calls + 2
            assert got.position == 8 == s.position
            assert_same_outputs(got, want)
            assert s.info().position == 8  # applied once
            assert_same_outputs(s.step("orld"), ref.step("orld"))  # and the state is the same


def test_lost_create_fork_delete_responses(server: Any) -> None:
    for method in (CREATE, FORK, DELETE):
        lossy = LoseResponses(method)
        with Client(server.target, retries=FAST_RETRY, interceptors=[lossy]) as c:
            lossy.remaining = 0
            s = c.session()
            s.step("abc")
            lossy.remaining = 1
            if method == CREATE:
                t = c.session()  # retry meets ALREADY_EXISTS: success
                assert t.position == 0
                t.delete()
            elif method == FORK:
                f = s.fork()  # retry meets ALREADY_EXISTS: success, position read back
                assert f.position == 3
                f.delete()
            s.delete()  # for DELETE: retry meets NOT_FOUND: success
            assert lossy.calls == 2 or method != DELETE
            with pytest.raises(SessionNotFound):
                c.attach(s.session_id)


def test_retries_disabled(server: Any) -> None:
    lossy = LoseResponses(STEP)
    with Client(server.target, retries=RetryPolicy.disabled(), interceptors=[lossy]) as c, c.session() as s:
        with pytest.raises(Unavailable):
            s.step("ab")
        # The step was applied; repeating it with the same expected position replays it.
        assert s.position == 0
        r = s.step("ab")
        assert r.position == 2 and s.info().position == 2


# =========================================================================== asyncio client


@pytest.fixture
async def aclient(server: Any) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(server.target, timeout=30) as c:
        yield c


async def test_async_basics(aclient: AsyncClient, vocab: list[str]) -> None:
    info = await aclient.model_info()
    assert info.vocab == vocab and info.cell_type == "lstm"
    async with aclient.session() as s:
        assert isinstance(s, AsyncSession) and s.position == 0
        r = await s.step("First", return_logprobs=True)
        assert r.position == 5 and r.text == "First"
        assert r.outputs[0].logprobs is not None and len(r.outputs[0].logprobs) == len(vocab)
        f = await s.fork()
        assert f.position == 5
        await f.reset()
        assert f.position == 0
        await f.delete()
        with pytest.raises(SessionNotFound):
            await f.info()
        sid = s.session_id
    with pytest.raises(SessionNotFound):
        await aclient.attach(sid)
    s2 = await aclient.session(keep=True)
    attached = await aclient.attach(s2.session_id)
    assert attached.position == 0
    await attached.delete()


async def test_async_matches_sync(server: Any, aclient: AsyncClient) -> None:
    with Client(server.target) as c, c.session() as ref:
        want = ref.step("To be, or")
    async with aclient.session() as s:
        assert_same_outputs(await s.step("To be, or"), want)


async def test_async_stream(aclient: AsyncClient) -> None:
    async def live() -> AsyncIterator[str]:
        for piece in ["To ", "be, ", "or not"]:
            await asyncio.sleep(0.001)
            yield piece

    async with aclient.session() as s, aclient.session() as ref:
        results = [r async for r in s.stream(live(), top_k=2)]
        assert [r.position for r in results] == [3, 7, 13]
        for piece, r in zip(["To ", "be, ", "or not"], results, strict=True):
            assert_same_outputs(r, await ref.step(piece, top_k=2))
        plain = [r async for r in s.stream(["a", [0]])]  # a plain iterable works too
        assert [r.position for r in plain] == [14, 15]
        with pytest.raises(InvalidInput):
            _ = [r async for r in s.stream(["b", "\u00e9"])]
        assert s.position == 16


async def test_async_generate(aclient: AsyncClient) -> None:
    async with aclient.session() as s:
        toks = [t async for t in s.generate("ab", max_tokens=10, seed=3)]
        assert len(toks) == 10 and toks[-1].finish_reason == "length"
        assert s.position == 12
        a, b = await s.fork(), await s.fork()
        assert await a.generate_text(max_tokens=15, seed=9) == await b.generate_text(max_tokens=15, seed=9)
        await a.delete()
        await b.delete()


async def test_async_errors(aclient: AsyncClient, server: Any) -> None:
    with pytest.raises(SessionNotFound):
        await aclient.attach("no-such-session-0123456789")
    async with aclient.session() as s:
        other = await aclient.attach(s.session_id)
        await other.step("xy")
        with pytest.raises(PositionConflict) as info:
            await s.step("z")
        assert info.value.current_position == 2
        with pytest.raises(InvalidInput):
            await s.step("")
        with pytest.raises(AlreadyExists):
            await aclient.session(session_id=s.session_id)
        with pytest.raises(DeadlineExceeded):
            await other.generate_text(max_tokens=4000, timeout=0.05)
    async with AsyncClient(f"127.0.0.1:{closed_port()}", timeout=2, retries=FAST_RETRY) as dead:
        with pytest.raises(Unavailable):
            await dead.model_info()


async def test_async_calls_in_flight_when_the_client_closes_raise_cancelled(server: Any) -> None:
    client = AsyncClient(server.target, timeout=30)
    session = await client.session(keep=True)
    started = asyncio.Event()

    async def generate() -> None:
        async for _ in session.generate(max_tokens=4000):
            started.set()

    task = asyncio.create_task(generate())
    await asyncio.wait_for(started.wait(), 30)
    await client.close()
    with pytest.raises(Cancelled):  # in the hierarchy, not asyncio.CancelledError
        await task
    assert not task.cancelled()


async def test_async_stream_closes_a_waiting_input_iterator_when_the_server_fails_it(aclient: AsyncClient) -> None:
    closed = asyncio.Event()

    async def inputs() -> AsyncIterator[list[int]]:
        try:
            yield [9999]  # out of the vocabulary: the server ends the stream INVALID_ARGUMENT
            await asyncio.Event().wait()  # a live source with nothing more to send yet
        finally:
            closed.set()

    async with aclient.session() as s:
        with pytest.raises(InvalidInput):
            async for _ in s.stream(inputs()):
                pass
        await asyncio.wait_for(closed.wait(), 10)  # its cleanup ran; nothing left parked in it


async def test_async_lost_step_response(server: Any) -> None:
    lossy = AioLoseResponses(STEP, count=0)
    async with (
        AsyncClient(server.target, retries=FAST_RETRY, interceptors=[lossy]) as c,
        AsyncClient(server.target) as plain,
    ):
        async with c.session() as s, plain.session() as ref:
            await s.step("Hel")
            await ref.step("Hel")
            lossy.remaining = 1
            got = await s.step("lo, w")
            want = await ref.step("lo, w")
            assert lossy.calls == 3
            assert got.position == 8 and (await s.info()).position == 8
            assert_same_outputs(got, want)


# =========================================================================== CLI


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_info(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["--target", server.target, "info"], capsys)
    assert code == 0, err
    assert "cell type:          lstm" in out and "hidden size:        32" in out and "max_sessions" in out
    code, out, err = run_cli(["info", "--json", "--target", server.target], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["cell_type"] == "lstm" and data["hidden_size"] == 32 and data["limits"]["max_sessions"] > 0


def test_cli_generate(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--target", server.target, "generate", "ROMEO:", "--max-tokens", "25", "--seed", "5"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert out.endswith("\n") and 25 <= len(out) <= 26
    code, out2, _ = run_cli(argv, capsys)
    assert out2 == out  # same seed, same text
    code, out3, _ = run_cli(argv + ["--echo", "--temperature", "0"], capsys)
    assert code == 0 and out3.startswith("ROMEO:")


def test_cli_chat(server: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nbad \u00e9 line\nHow are you\n"))
    code, out, err = run_cli(["--target", server.target, "chat", "--max-tokens", "20", "--seed", "1"], capsys)
    assert code == 0, err
    assert out.count("\n\n") >= 2  # two replies, each ended by a blank line
    assert err.count("lstm-client: error: character '\u00e9'") == 1


def test_cli_score(server: Any, corpus: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = corpus[:700]
    f = tmp_path / "sample.txt"
    f.write_text(text, encoding="utf-8")
    code, out, err = run_cli(["--target", server.target, "score", str(f), "--chunk-size", "64"], capsys)
    assert code == 0, err
    fields = dict(line.split(":", 1) for line in out.strip().splitlines())
    nats = float(fields["loss"].split()[0])
    bits = float(fields["bits"].split()[0])
    assert bits == pytest.approx(nats / math.log(2), abs=2e-4)
    assert "699 scored" in fields["characters"]
    # The same number, computed with one plain step.
    with Client(server.target) as c, c.session() as s:
        r = s.step(text[:-1], top_k=0, return_logprobs=True)
        vocab = c.model_info().vocab
        want = 0.0
        for o, ch in zip(r.outputs, text[1:], strict=True):
            assert o.logprobs is not None
            want -= o.logprobs[vocab.index(ch)]
        assert nats == pytest.approx(want / (len(text) - 1), abs=1e-3)


def test_cli_score_errors(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("hello\nw\u00f6rld\n", encoding="utf-8")
    code, out, err = run_cli(["--target", server.target, "score", str(bad)], capsys)
    assert code == 1 and out == ""
    assert err == (
        f"lstm-client: error: character '\u00f6' (U+00F6) at line 2, column 2 of {bad} "
        "is not in the model's vocabulary (65 characters)\n"
    )
    short = tmp_path / "short.txt"
    short.write_text("a", encoding="utf-8")
    code, _, err = run_cli(["--target", server.target, "score", str(short)], capsys)
    assert code == 1 and err.count("\n") == 1 and "at least 2 characters" in err


def test_cli_server_errors_are_one_line(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["--target", server.target, "generate", "x", "--top-p", "2"], capsys)
    assert code == 1 and err.startswith("lstm-client: error: INVALID_ARGUMENT: ") and err.count("\n") == 1
    code, _, err = run_cli(["--target", server.target, "generate", "x", "--max-tokens", "999999"], capsys)
    assert code == 1 and err.startswith("lstm-client: error: INVALID_ARGUMENT: ") and err.count("\n") == 1
    code, _, err = run_cli(["--target", f"127.0.0.1:{closed_port()}", "--timeout", "2", "info"], capsys)
    assert code == 1 and err.startswith("lstm-client: error: UNAVAILABLE: ") and err.count("\n") == 1
    code, _, err = run_cli(["--target", server.target, "generate", "\u00e9"], capsys)
    assert code == 1 and "not in the model's vocabulary" in err and err.count("\n") == 1


def test_cli_as_a_process(server: Any) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CLIENT_SRC), env.get("PYTHONPATH", "")]))
    env["LSTM_SERVE_TARGET"] = server.target
    proc = subprocess.run(
        [sys.executable, "-m", "lstmserve_client.cli", "generate", "a", "--max-tokens", "10"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout) in (10, 11)
    proc = subprocess.run(
        [sys.executable, "-m", "lstmserve_client.cli", "--target", server.target, "score", "/nonexistent"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1 and proc.stderr.startswith("lstm-client: error: cannot read /nonexistent")
    proc = subprocess.run(
        [sys.executable, "-m", "lstmserve_client.cli", "nonsense"], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 2


def test_threads_share_a_client(client: Client) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with client.session() as s:
                for _ in range(5):
                    s.step("ab")
                assert s.position == 10
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# =========================================================== open calls, retries after a resync, deadlines, metadata

GENERATE = "/lstmserve.v1.LstmService/Generate"


class LoseArmedGenerate(grpc.UnaryStreamClientInterceptor):  # type: ignore[misc,unused-ignore]
    """When armed, lets one Generate run on the server (its prompt fed, a token sampled), then
    tells the caller the connection broke (UNAVAILABLE)."""

    def __init__(self) -> None:
        self.armed = False

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        call = continuation(client_call_details, request)
        if self.armed and _method(client_call_details) == GENERATE:
            self.armed = False
            next(iter(call))  # the server has fed the prompt
            call.cancel()
            time.sleep(0.3)  # the cancellation settles on the server

            class Lost:
                def __iter__(self) -> Iterator[Any]:
                    raise LostResponse()

                def cancel(self) -> bool:
                    return True

            return Lost()
        return call


class AioLoseArmedGenerate(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc,unused-ignore]
    def __init__(self) -> None:
        self.armed = False

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        call = await continuation(client_call_details, request)
        if self.armed and _method(client_call_details) == GENERATE:
            self.armed = False
            await call.read()
            call.cancel()
            await asyncio.sleep(0.3)

            async def lost() -> AsyncIterator[Any]:
                raise grpc.aio.AioRpcError(
                    code=grpc.StatusCode.UNAVAILABLE,
                    initial_metadata=grpc.aio.Metadata(),
                    trailing_metadata=grpc.aio.Metadata(),
                    details="simulated lost response",
                )
                yield  # pragma: no cover

            return lost()
        return call


def test_generate_retried_after_a_resync_never_feeds_its_prompt_twice(server: Any) -> None:
    """After a broken-off generation the session re-reads its position; a Generate whose first
    attempt is then lost (prompt fed) must not run again at the server's new position."""
    lossy = LoseArmedGenerate()
    with Client(server.target, timeout=30, retries=FAST_RETRY, interceptors=[lossy]) as c, c.session() as s:
        s.step("Hello")
        for _ in s.generate(max_tokens=3, seed=1):
            break  # the session is now stale
        time.sleep(0.3)
        lossy.armed = True
        with pytest.raises(PositionConflict):
            s.generate_text("ABC", max_tokens=5, seed=7)
        assert s.info().position <= 5 + 3 + 3 + 5  # at most: Hello, the first generation, ABC + 5 once


async def test_async_generate_retried_after_a_resync_never_feeds_its_prompt_twice(server: Any) -> None:
    lossy = AioLoseArmedGenerate()
    async with AsyncClient(server.target, timeout=30, retries=FAST_RETRY, interceptors=[lossy]) as c:
        async with c.session() as s:
            await s.step("Hello")
            gen = s.generate(max_tokens=3, seed=1)
            async for _ in gen:
                break
            await gen.aclose()
            await asyncio.sleep(0.3)
            lossy.armed = True
            with pytest.raises(PositionConflict):
                await s.generate_text("ABC", max_tokens=5, seed=7)


def test_a_generation_kept_in_a_variable_is_closed_by_the_next_step(client: Client) -> None:
    """`break` does not close a generator held in a variable; the session's next step does
    (cancelling the call and re-reading the position) instead of conflicting with it."""
    with client.session() as s:
        tokens = s.generate(max_tokens=4000)
        for i, _ in enumerate(tokens):
            if i == 3:
                break
        r = s.step("x")  # PositionConflict before: the generation ran on behind it
        assert r.position == s.info().position < 4000
        results = s.stream(["a"] * 200, top_k=0)
        next(results)
        s.reset()
        assert s.position == 0 and s.step("y").position == 1


async def test_async_generation_kept_in_a_variable_is_closed_by_the_next_step(aclient: AsyncClient) -> None:
    async with aclient.session() as s:
        tokens = s.generate(max_tokens=4000)
        i = 0
        async for _ in tokens:
            i += 1
            if i == 3:
                break
        r = await s.step("x")
        assert r.position == (await s.info()).position < 4000


async def test_async_stream_past_its_deadline_raises_deadline_exceeded(aclient: AsyncClient) -> None:
    """grpc.aio may end such a stream with INTERNAL ("Internal error from Core")."""
    for _ in range(6):
        async with aclient.session() as s:
            with pytest.raises(DeadlineExceeded):
                _ = [r async for r in s.stream(["a"] * 3000, timeout=0.01)]


def test_generate_timeout_counts_from_the_first_iteration(client: Client) -> None:
    with client.session() as s:
        tokens = s.generate(max_tokens=3, timeout=0.5)
        time.sleep(0.6)
        assert len(list(tokens)) == 3
        with pytest.raises(DeadlineExceeded, match="before the call was made"):
            s.step("a", timeout=1e-9)


def test_bad_token_or_metadata_refused_when_the_client_is_built(server: Any) -> None:
    for kwargs in (
        {"token": "tökén"},
        {"token": "abc\ndef"},
        {"metadata": [("Bad Key", "v")]},
        {"metadata": [("grpc-timeout", "1S")]},
        {"metadata": [("x-note", "naïve")]},
    ):
        with pytest.raises(InvalidInput):
            Client(server.target, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="-bin"):
        Client(server.target, metadata=[("x-blob-bin", "text")])
    with pytest.raises(InvalidInput):
        AsyncClient(server.target, token="tökén")
    with Client(server.target, metadata=[("X-Note", "fine"), ("x-blob-bin", b"\x00\xff")]) as c:
        assert c.model_info().vocab  # accepted by the server


def test_cli_non_utf8_stdin_is_one_line(server: Any) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CLIENT_SRC), env.get("PYTHONPATH", "")]))
    env["PYTHONIOENCODING"] = "utf-8"  # strict decoding, as under many UTF-8 locales
    for command in (["score", "-"], ["chat"]):
        proc = subprocess.run(
            [sys.executable, "-m", "lstmserve_client.cli", "--target", server.target, *command],
            input=b"abc \xff\xfe def\n",
            capture_output=True,
            env=env,
            timeout=60,
        )
        stderr = proc.stderr.decode()
        assert proc.returncode == 1 and stderr.startswith("lstm-client: error: <stdin> is not UTF-8 text"), stderr
        assert "Traceback" not in stderr
