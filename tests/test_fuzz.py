"""Hard to break: property-based fuzzing of every RPC and field, malformed wire bytes, TCP garbage.

One server (module scope, --max-message-bytes 64 KiB) takes a few thousand generated calls.
Every call is checked against an oracle of the answer the server owes it (a model of the
sessions this module owns: positions and last steps), so a wrong status is a failure, and a
caller's mistake must never come back as UNKNOWN or INTERNAL.

Witness sessions are fed known text before and, by a background thread, during the run
(the fuzz only sends them requests that must be refused). After the run the server still
answers health checks, the engine queue is empty, every fuzz session is where the oracle
says, and the witnesses' outputs equal an offline forward of their whole input.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import string
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lstmserve_client.proto import lstm_service_pb2 as pb
from lstmserve_client.proto import lstm_service_pb2_grpc as pb_grpc

from model.checkpoint import load_checkpoint, sha256_file
from tests.conftest import RunningServer, corpus_text, offline_logprobs, run_server

Code = grpc.StatusCode
OK, INVALID, NOT_FOUND, ABORTED = Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ABORTED
EXISTS, EXHAUSTED = Code.ALREADY_EXISTS, Code.RESOURCE_EXHAUSTED
NEVER_FOR_A_CALLER = {Code.UNKNOWN, Code.INTERNAL}

MAX_MESSAGE = 64 * 1024
MAX_TOKENS = 4096  # per request (server default)
MAX_GENERATE = 4096
MAX_TTL = 7 * 24 * 3600
DEFAULT_TTL = 1800
KEEP_TTL = 600  # sessions with a shorter ttl are deleted at once (they could expire under the oracle)
VOCAB_TEXT = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
VOCAB = len(VOCAB_TEXT)
HIDDEN = 32
ID_ALPHABET = string.ascii_letters + string.digits + "-_"
TOL = 1e-4
SERVICE = "/lstmserve.v1.LstmService/"

# LSTM_FUZZ_SCALE=10 runs ten times the examples (a longer, nightly fuzz); the default keeps CI to ~2 minutes.
SCALE = float(os.environ.get("LSTM_FUZZ_SCALE", "1"))
SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


def rarely(common: st.SearchStrategy, rare: st.SearchStrategy, odds: int = 8) -> st.SearchStrategy:
    """`rare` about once in `odds` draws (big inputs are slow to build and to run)."""
    return st.one_of(*([common] * (odds - 1)), rare)


def float32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


# ---- the oracle's model of the sessions this module owns ----------------------------------------

UNKNOWN_LAST = "unknown"  # after a failed stream, later requests of it may or may not have run


@dataclass
class SessionModel:
    position: int = 0
    last_step: Any = None  # (start position, tokens) of the most recent step, None, or UNKNOWN_LAST


@dataclass
class World:
    server: RunningServer
    stub: pb_grpc.LstmServiceStub
    channel: grpc.Channel
    witnesses: Witnesses
    sessions: dict[str, SessionModel] = field(default_factory=dict)  # fuzz-owned, in creation order
    codes: Counter = field(default_factory=Counter)

    def record(self, code: Code, what: str, details: str) -> None:
        self.codes[code.name] += 1
        assert code not in NEVER_FOR_A_CALLER, f"{what} -> {code.name}: {details}"
        assert len(details) < 2048, f"{what}: status details of {len(details)} characters"

    def known(self, sid: str) -> bool:
        return sid in self.sessions or sid in self.witnesses.ids

    def new_session(self) -> str:
        sid = self.stub.CreateSession(pb.CreateSessionRequest(), timeout=30).session.session_id
        self.sessions[sid] = SessionModel()
        return sid

    def trim(self, keep: int = 40) -> None:
        while len(self.sessions) > keep:
            sid = next(iter(self.sessions))
            self.stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=30)
            del self.sessions[sid]
        while len(self.sessions) < 4:
            self.new_session()

    def resolve(self, target: tuple[str, int, str], mutating: bool = True) -> str:
        """A session id for a drawn target: one of ours, a witness, an unknown or a malformed id."""
        kind, index, raw = target
        if kind == "witness" and not mutating:
            return self.witnesses.ids[index % len(self.witnesses.ids)]
        if kind in ("pool", "witness"):
            pool = list(self.sessions)
            return pool[index % len(pool)]
        return raw

    def refresh(self, sid: str) -> None:
        """Re-read a session's position (after a stream whose tail may or may not have run)."""
        if sid in self.sessions:
            self.sessions[sid].position = self.stub.GetSession(
                pb.GetSessionRequest(session_id=sid), timeout=30
            ).session.position
            self.sessions[sid].last_step = UNKNOWN_LAST


# ---- witnesses: fed known text before and during the run -----------------------------------------


class Witnesses:
    """A few sessions fed corpus text by a background thread; every output is kept for the final check."""

    def __init__(self, target: str, n: int = 3, length: int = 2500, pause: float = 0.12) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.LstmServiceStub(self.channel)
        corpus = corpus_text()
        self.ids: list[str] = []
        self.plan: dict[str, list[int]] = {}
        self.fed: dict[str, list[int]] = {}
        self.logprobs: dict[str, list[np.ndarray]] = {}
        self.errors: list[str] = []
        self.rng = random.Random(7)
        self.pause = pause
        for i in range(n):
            sid = self.stub.CreateSession(pb.CreateSessionRequest(), timeout=30).session.session_id
            start = 10_000 + i * 37_000
            self.ids.append(sid)
            self.plan[sid] = [VOCAB_TEXT.index(c) for c in corpus[start : start + length]]
            self.fed[sid] = []
            self.logprobs[sid] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="witness-feeder", daemon=True)

    def feed_once(self) -> bool:
        hungry = [sid for sid in self.ids if len(self.fed[sid]) < len(self.plan[sid])]
        if not hungry:
            return False
        sid = self.rng.choice(hungry)
        done = len(self.fed[sid])
        chunks = []
        for _ in range(self.rng.randint(1, 3)):
            n = self.rng.randint(1, 48)
            chunk = self.plan[sid][done : done + n]
            if chunk:
                chunks.append(chunk)
                done += len(chunk)
        try:
            if self.rng.random() < 0.5:
                responses = [
                    self.stub.Step(pb.StepRequest(session_id=sid, tokens=c, return_logprobs=True), timeout=30)
                    for c in chunks
                ]
            else:
                requests = [
                    pb.StepRequest(session_id=sid, text="".join(VOCAB_TEXT[t] for t in c), return_logprobs=True,
                                   return_hidden=True, top_k=0, expected_position=len(self.fed[sid]) + k)
                    for c, k in zip(chunks, np.cumsum([0] + [len(c) for c in chunks[:-1]]).tolist())
                ]
                responses = list(self.stub.StreamSteps(iter(requests), timeout=30))
        except grpc.RpcError as e:
            self.errors.append(f"witness step failed: {e.code().name} {e.details()}")
            return False
        for chunk, response in zip(chunks, responses):
            self.fed[sid].extend(chunk)
            if response.position != len(self.fed[sid]):
                self.errors.append(f"witness position {response.position} != {len(self.fed[sid])}")
            self.logprobs[sid].append(np.array([list(o.logprobs) for o in response.outputs], dtype=np.float32))
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.pause):
            self.feed_once()

    def start(self) -> None:
        for _ in range(3 * len(self.ids)):
            self.feed_once()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)

    def close(self) -> None:
        self.stop()
        self.channel.close()


@pytest.fixture(scope="module")
def world(tiny_checkpoint: Path) -> Iterator[World]:
    with run_server(tiny_checkpoint, max_message_bytes=MAX_MESSAGE) as srv:
        witnesses = Witnesses(srv.target)
        witnesses.start()
        channel = grpc.insecure_channel(srv.target)
        w = World(srv, pb_grpc.LstmServiceStub(channel), channel, witnesses)
        try:
            yield w
        finally:
            witnesses.close()
            channel.close()


# ---- calling helpers -------------------------------------------------------------------------------


def unary(fn: Callable[..., Any], request: Any, **kw: Any) -> tuple[Code, str, Any]:
    try:
        return OK, "", fn(request, timeout=30, **kw)
    except grpc.RpcError as e:
        return e.code(), e.details() or "", None


def drain(call: Any) -> tuple[list[Any], Code, str]:
    out: list[Any] = []
    try:
        for response in call:
            out.append(response)
    except grpc.RpcError as e:
        return out, e.code(), e.details() or ""
    return out, OK, ""


# ---- strategies --------------------------------------------------------------------------------------

int32 = st.integers(-(2**31), 2**31 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
valid_ids = st.text(ID_ALPHABET, min_size=22, max_size=128)
malformed_ids = st.one_of(
    st.text(ID_ALPHABET, min_size=1, max_size=21),
    st.text(ID_ALPHABET, min_size=129, max_size=200),
    st.text(min_size=1, max_size=40),  # any unicode (valid UTF-8)
    st.builds(lambda c, n: c * n, st.sampled_from("Aé/~ \x00"), st.sampled_from([22, 23, 60_000])),
)
# (kind, index into the pool, raw id for the other kinds)
ours = st.tuples(st.just("pool"), st.integers(0, 2**16), st.just(""))
targets = st.one_of(
    ours,
    ours,
    st.tuples(st.sampled_from(["pool", "witness"]), st.integers(0, 2**16), st.just("")),
    st.tuples(st.just("unknown"), st.just(0), valid_ids),
    st.tuples(st.just("malformed"), st.just(0), st.one_of(st.just(""), malformed_ids)),
)
token_lists = rarely(
    st.one_of(
        st.lists(st.integers(0, VOCAB - 1), max_size=40),
        st.lists(int32, max_size=12),
        st.lists(st.integers(-3, VOCAB + 3), min_size=1, max_size=12),
    ),
    st.builds(lambda n, t: [t] * n, st.sampled_from([MAX_TOKENS, MAX_TOKENS + 1, 12_000]), st.integers(0, VOCAB)),
)
texts = rarely(
    st.one_of(
        st.text(VOCAB_TEXT, max_size=40),
        st.text(max_size=20),
        st.builds(lambda c: c, st.sampled_from("é\x00\u2603\r\t")),
    ),
    st.builds(lambda c, n: c * n, st.sampled_from("xé"), st.sampled_from([MAX_TOKENS, MAX_TOKENS + 1, 40_000])),
)
top_ks = st.one_of(st.none(), st.integers(0, VOCAB), st.integers(-2, VOCAB + 2), int32)
# None, a number, or a position relative to the session ("current", "previous", "next", "last step")
expected_positions = st.one_of(
    st.none(), st.sampled_from(["current", "current", "previous", "next", "last"]), int64, st.integers(-1, 5)
)
floats32 = st.floats(width=32)


@st.composite
def step_specs(draw: Any) -> dict[str, Any]:
    form = draw(st.sampled_from(["tokens", "tokens", "text", "text", "both", "none"]))
    return {
        "target": draw(targets),
        "tokens": draw(token_lists) if form in ("tokens", "both") else [],
        "text": draw(texts) if form in ("text", "both") else "",
        "top_k": draw(top_ks),
        "expected": draw(expected_positions),
        "return_logprobs": draw(st.booleans()),
        "return_hidden": draw(st.booleans()),
    }


valid_step_specs = st.fixed_dictionaries({  # steps that should run: state keeps moving under the fuzz
    "target": ours,
    "tokens": st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=30),
    "text": st.just(""),
    "top_k": st.one_of(st.none(), st.integers(0, VOCAB)),
    "expected": st.one_of(st.none(), st.just("current"), st.just("last")),
    "return_logprobs": st.booleans(),
    "return_hidden": st.booleans(),
})


def resolve_expected(spec: Any, model: SessionModel | None) -> int | None:
    if spec is None or isinstance(spec, int):
        return spec
    if model is None:
        return 0
    if spec == "last" and isinstance(model.last_step, tuple):
        return model.last_step[0]
    return model.position + {"current": 0, "previous": -1, "next": 1, "last": -1}[spec]


def encode(text: str) -> list[int] | None:
    try:
        return [VOCAB_TEXT.index(c) for c in text]
    except ValueError:
        return None


def input_error(tokens: list[int], text: str) -> str | None:
    """Why the input part of a request is invalid (or None), as the server checks it."""
    if tokens and text:
        return "both tokens and text"
    if text:
        if len(text) > MAX_TOKENS or encode(text) is None:
            return "text"
        tokens = encode(text) or []
    if len(tokens) > MAX_TOKENS or any(not 0 <= t < VOCAB for t in tokens):
        return "tokens"
    return None


def step_request(world: World, spec: dict[str, Any]) -> tuple[pb.StepRequest, list[int] | None, str | None]:
    """The request, its input tokens, and why it is invalid (a witness only ever gets invalid ones)."""

    def build(sid: str) -> pb.StepRequest:
        kw: dict[str, Any] = {}
        if spec["top_k"] is not None:
            kw["top_k"] = spec["top_k"]
        expected = resolve_expected(spec["expected"], world.sessions.get(sid))
        if expected is not None:
            kw["expected_position"] = expected
        return pb.StepRequest(session_id=sid, tokens=spec["tokens"], text=spec["text"],
                              return_logprobs=spec["return_logprobs"], return_hidden=spec["return_hidden"], **kw)

    def invalid(request: pb.StepRequest) -> tuple[list[int] | None, str | None]:
        if not request.session_id:
            return None, "no session_id"
        why = input_error(list(request.tokens), request.text)
        if why:
            return None, why
        tokens = encode(request.text) if request.text else list(request.tokens)
        if not tokens:
            return tokens, "empty input"
        top_k = request.top_k if request.HasField("top_k") else 5
        if not 0 <= top_k <= VOCAB:
            return tokens, "top_k"
        if request.HasField("expected_position") and request.expected_position < 0:
            return tokens, "negative expected_position"
        return tokens, None

    request = build(world.resolve(spec["target"], mutating=False))
    tokens, why = invalid(request)
    if why is None and request.session_id in world.witnesses.ids:  # a valid step would move a witness
        request = build(world.resolve(spec["target"], mutating=True))
        tokens, why = invalid(request)
    return request, tokens, why


def too_big(request: Any) -> bool:
    return request.ByteSize() > MAX_MESSAGE


def expect_step(world: World, request: pb.StepRequest, tokens: list[int] | None, why: str | None) -> tuple[set, bool]:
    """(allowed codes, whether an OK is the replay of the session's last step)."""
    if too_big(request):
        return {EXHAUSTED}, False
    if why is not None:
        return {INVALID}, False
    model = world.sessions.get(request.session_id)
    if model is None:
        return {NOT_FOUND}, False
    if request.HasField("expected_position"):
        expected = request.expected_position
        last = model.last_step
        if last == UNKNOWN_LAST and expected != model.position:
            return {ABORTED, OK}, True
        if isinstance(last, tuple) and last == (expected, tuple(tokens or ())) and model.position == expected + len(
            last[1]
        ):
            return {OK}, True
        if expected != model.position:
            return {ABORTED}, False
    return {OK}, False


def check_step_response(world: World, request: pb.StepRequest, tokens: list[int], replay: bool,
                        response: pb.StepResponse) -> None:
    model = world.sessions[request.session_id]
    assert response.session_id == request.session_id
    assert [o.token for o in response.outputs] == tokens
    if replay:
        assert response.position == model.position  # answered again, not applied again
        return
    assert response.position == model.position + len(tokens), (model, request.expected_position)
    top_k = request.top_k if request.HasField("top_k") else 5
    for o in response.outputs:
        assert len(o.top_tokens) == len(o.top_logprobs) == top_k
        assert all(0 <= t < VOCAB for t in o.top_tokens)
        assert list(o.top_logprobs) == sorted(o.top_logprobs, reverse=True)
        assert len(o.logprobs) == (VOCAB if request.return_logprobs else 0)
        assert len(o.hidden) == (HIDDEN if request.return_hidden else 0)
        if request.return_logprobs:
            lp = np.array(o.logprobs, dtype=np.float64)
            assert np.isfinite(lp).all() and abs(np.log(np.exp(lp).sum())) < 1e-3
    model.position = response.position
    model.last_step = (response.position - len(tokens), tuple(tokens))


# ---- Step ----------------------------------------------------------------------------------------------


@settings(max_examples=examples(700), **SETTINGS)
@given(spec=st.one_of(step_specs(), valid_step_specs))
def test_fuzz_step(world: World, spec: dict[str, Any]) -> None:
    world.trim()
    request, tokens, why = step_request(world, spec)
    allowed, replay = expect_step(world, request, tokens, why)
    code, details, response = unary(world.stub.Step, request)
    world.record(code, "Step", details)
    assert code in allowed, (code, details, why)
    if code == NOT_FOUND and len(request.session_id) > 8:
        assert request.session_id not in details  # a session id is never echoed in full
    if code == ABORTED:
        assert "expected_position" in details
    if code == OK:
        check_step_response(world, request, tokens or [], replay, response)


# ---- Generate -----------------------------------------------------------------------------------------


@st.composite
def generate_specs(draw: Any) -> dict[str, Any]:
    form = draw(st.sampled_from(["none", "none", "tokens", "text", "both"]))
    return {
        "target": draw(targets),
        "prompt_tokens": draw(token_lists) if form in ("tokens", "both") else [],
        "prompt_text": draw(texts) if form in ("text", "both") else "",
        "max_tokens": draw(st.one_of(st.integers(1, 6), st.integers(max_value=0, min_value=-(2**31)),
                                     st.integers(MAX_GENERATE + 1, 2**31 - 1))),
        "temperature": draw(st.one_of(st.none(), st.floats(0, 2, width=32), floats32,
                                      st.sampled_from([float("nan"), float("inf"), -float("inf"), 100.0, 100.5,
                                                       -0.0, 1e-45])))
        ,
        "top_k": draw(top_ks),
        "top_p": draw(st.one_of(st.none(), st.floats(float32(1e-6), 1, width=32), floats32,
                                st.sampled_from([float("nan"), float("inf"), 0.0, 1.0, 1.0000001, 1e-45]))),
        "seed": draw(st.one_of(st.none(), st.integers(0, 2**64 - 1))),
        "stop": draw(st.lists(st.one_of(st.text(VOCAB_TEXT, min_size=1, max_size=3), st.text(max_size=4),
                                        st.builds(lambda n: "z" * n, st.sampled_from([256, 257]))), max_size=18)),
        "expected": draw(expected_positions),
    }


valid_generate_specs = st.fixed_dictionaries({
    "target": ours,
    "prompt_tokens": st.lists(st.integers(0, VOCAB - 1), max_size=10),
    "prompt_text": st.just(""),
    "max_tokens": st.integers(1, 6),
    "temperature": st.one_of(st.none(), st.floats(0, 2, width=32)),
    "top_k": st.one_of(st.none(), st.integers(0, VOCAB)),
    "top_p": st.one_of(st.none(), st.floats(float32(0.01), 1, width=32)),
    "seed": st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    "stop": st.lists(st.text(VOCAB_TEXT, min_size=1, max_size=2), max_size=3),
    "expected": st.one_of(st.none(), st.just("current")),
})


def generate_request(world: World, spec: dict[str, Any]) -> tuple[pb.GenerateRequest, list[int] | None, str | None]:
    def build(sid: str) -> pb.GenerateRequest:
        kw = {k: spec[k] for k in ("temperature", "top_k", "top_p", "seed") if spec[k] is not None}
        expected = resolve_expected(spec["expected"], world.sessions.get(sid))
        if expected is not None:
            kw["expected_position"] = expected
        return pb.GenerateRequest(session_id=sid, prompt_tokens=spec["prompt_tokens"], prompt_text=spec["prompt_text"],
                                  max_tokens=spec["max_tokens"], stop=spec["stop"], **kw)

    def invalid(r: pb.GenerateRequest) -> tuple[list[int] | None, str | None]:
        if not r.session_id:
            return None, "no session_id"
        why = input_error(list(r.prompt_tokens), r.prompt_text)
        if why:
            return None, "prompt " + why
        prompt = encode(r.prompt_text) if r.prompt_text else list(r.prompt_tokens)
        temperature = r.temperature if r.HasField("temperature") else 1.0
        top_p = r.top_p if r.HasField("top_p") else 1.0
        top_k = r.top_k if r.HasField("top_k") else 0
        if not 1 <= r.max_tokens <= MAX_GENERATE:
            return prompt, "max_tokens"
        if not np.isfinite(temperature) or not 0 <= temperature <= 100:
            return prompt, "temperature"
        if not 0 <= top_k <= VOCAB:
            return prompt, "top_k"
        if not np.isfinite(top_p) or not 0 < top_p <= 1:
            return prompt, "top_p"
        if len(r.stop) > 16 or any(not s or len(s) > 256 for s in r.stop):
            return prompt, "stop"
        if any(ch not in VOCAB_TEXT for s in r.stop for ch in s):  # could never occur in generated text
            return prompt, "stop outside the vocabulary"
        if r.HasField("expected_position") and r.expected_position < 0:
            return prompt, "negative expected_position"
        return prompt, None

    request = build(world.resolve(spec["target"], mutating=False))
    prompt, why = invalid(request)
    if why is None and request.session_id in world.witnesses.ids:
        request = build(world.resolve(spec["target"], mutating=True))
        prompt, why = invalid(request)
    return request, prompt, why


@settings(max_examples=examples(450), **SETTINGS)
@given(spec=st.one_of(generate_specs(), valid_generate_specs))
def test_fuzz_generate(world: World, spec: dict[str, Any]) -> None:
    world.trim()
    request, prompt, why = generate_request(world, spec)
    model = world.sessions.get(request.session_id)
    if too_big(request):
        allowed = {EXHAUSTED}
    elif why is not None:
        allowed = {INVALID}
    elif model is None:
        allowed = {NOT_FOUND}
    elif request.HasField("expected_position") and request.expected_position != model.position:
        allowed = {ABORTED}
    else:
        allowed = {OK}
    responses, code, details = drain(world.stub.Generate(request, timeout=30))
    world.record(code, "Generate", details)
    assert code in allowed, (code, details, why)
    if code != OK:
        assert not responses
        return
    assert model is not None and prompt is not None
    base = model.position + len(prompt)
    text = ""
    for i, r in enumerate(responses):
        assert 0 <= r.token < VOCAB and r.text == VOCAB_TEXT[r.token]
        assert r.position == base + i + 1
        assert r.logprob <= 1e-6 and np.isfinite(r.logprob)
        text += r.text
        stopped = any(text.endswith(s) for s in request.stop)
        last = i == len(responses) - 1
        if stopped:
            assert last and r.finish_reason == pb.FINISH_REASON_STOP
        elif last:
            assert len(responses) == request.max_tokens and r.finish_reason == pb.FINISH_REASON_LENGTH
        else:
            assert r.finish_reason == pb.FINISH_REASON_UNSPECIFIED
    model.position = responses[-1].position
    model.last_step = None


@settings(max_examples=examples(40), **SETTINGS)
@given(prompt=st.text(VOCAB_TEXT, min_size=1, max_size=20),
       temperature=st.floats(float32(1e-45), float32(1e-12), width=32), seed=st.integers(0, 2**64 - 1))
def test_fuzz_tiny_temperature_samples_like_greedy(world: World, prompt: str, temperature: float, seed: int) -> None:
    """A temperature just above 0 (1e-12 down to the smallest float32) picks what greedy picks: logits / 1e-40
    must not overflow into a nan distribution. (Logits a float32 step apart, ~5e-7, are e^-500000 apart here.)"""
    texts = []
    for t in (0.0, temperature):
        sid = world.new_session()
        request = pb.GenerateRequest(session_id=sid, prompt_text=prompt, max_tokens=8, temperature=t, seed=seed)
        responses = list(world.stub.Generate(request, timeout=30))
        world.sessions[sid] = SessionModel(responses[-1].position)
        texts.append("".join(r.text for r in responses))
    assert texts[0] == texts[1], (temperature, texts)


# ---- the session RPCs ---------------------------------------------------------------------------------


@st.composite
def session_ops(draw: Any) -> dict[str, Any]:
    return {
        "op": draw(st.sampled_from(["create", "create", "get", "delete", "reset", "fork", "fork", "info"])),
        "target": draw(targets),
        "ttl": draw(st.one_of(st.none(), st.sampled_from([0, 1, KEEP_TTL, MAX_TTL, MAX_TTL + 1, -1]), int32)),
        "new_id": draw(st.one_of(st.just(""), st.just(""), valid_ids, malformed_ids, st.just("existing"))),
    }


def ttl_ok(ttl: int | None) -> bool:
    return ttl is None or 1 <= ttl <= MAX_TTL


def id_ok(sid: str) -> bool:
    return not sid or (22 <= len(sid) <= 128 and all(c in ID_ALPHABET for c in sid))


def adopt(world: World, session: pb.Session, ttl: int | None, position: int) -> None:
    """Track a session the fuzz created (or delete it at once if its ttl could run out under the oracle)."""
    assert session.ttl_seconds == (DEFAULT_TTL if ttl is None else ttl)
    assert session.position == position
    assert abs(session.expire_time.seconds - session.create_time.seconds - session.ttl_seconds) <= 2
    if session.ttl_seconds < KEEP_TTL:
        code, details, _ = unary(world.stub.DeleteSession, pb.DeleteSessionRequest(session_id=session.session_id))
        assert code == OK, details
    else:
        world.sessions[session.session_id] = SessionModel(position)


@settings(max_examples=examples(700), **SETTINGS)
@given(spec=session_ops())
def test_fuzz_session_rpcs(world: World, spec: dict[str, Any]) -> None:
    world.trim()
    op, ttl = spec["op"], spec["ttl"]
    new_id = next(iter(world.sessions)) if spec["new_id"] == "existing" else spec["new_id"]
    sid = world.resolve(spec["target"], mutating=op in ("delete", "reset"))
    ttl_kw = {} if ttl is None else {"ttl_seconds": ttl}
    if op == "info":
        code, details, response = unary(world.stub.GetModelInfo, pb.GetModelInfoRequest())
        world.record(code, op, details)
        assert code == OK and "".join(response.vocab) == VOCAB_TEXT
        assert response.limits.max_message_bytes == MAX_MESSAGE
        return
    if op == "create":
        request = pb.CreateSessionRequest(session_id=new_id, **ttl_kw)
        if too_big(request):
            allowed = {EXHAUSTED}
        elif not ttl_ok(ttl) or not id_ok(new_id):
            allowed = {INVALID}
        elif new_id and world.known(new_id):
            allowed = {EXISTS}
        else:
            allowed = {OK}
        code, details, response = unary(world.stub.CreateSession, request)
        world.record(code, op, details)
        assert code in allowed, (code, details)
        if code == OK:
            assert response.session.session_id == new_id or (not new_id and id_ok(response.session.session_id))
            adopt(world, response.session, ttl, 0)
        return
    model = world.sessions.get(sid)
    exists = world.known(sid)
    if op == "fork":
        request = pb.ForkSessionRequest(session_id=sid, new_session_id=new_id, **ttl_kw)
        if too_big(request):
            allowed = {EXHAUSTED}
        elif not sid:
            allowed = {INVALID}
        elif not exists:
            allowed = {NOT_FOUND}
        elif not ttl_ok(ttl) or not id_ok(new_id):
            allowed = {INVALID}
        elif new_id and world.known(new_id):
            allowed = {EXISTS}
        else:
            allowed = {OK}
        code, details, response = unary(world.stub.ForkSession, request)
        world.record(code, op, details)
        assert code in allowed, (code, details)
        if code == OK:
            new = response.session
            assert new.session_id != sid and (new.session_id == new_id or not new_id)
            adopt(world, new, ttl, model.position if model else new.position)
        return
    fn, request = {
        "get": (world.stub.GetSession, pb.GetSessionRequest(session_id=sid)),
        "delete": (world.stub.DeleteSession, pb.DeleteSessionRequest(session_id=sid)),
        "reset": (world.stub.ResetSession, pb.ResetSessionRequest(session_id=sid)),
    }[op]
    code, details, response = unary(fn, request)
    world.record(code, op, details)
    want = EXHAUSTED if too_big(request) else INVALID if not sid else OK if exists else NOT_FOUND
    assert code == want, (op, code, details)
    if code == NOT_FOUND and len(sid) > 8:
        assert sid not in details
    if code == OK and op == "get" and model is not None:
        assert response.session.position == model.position
    if code == OK and op == "reset":
        assert response.session.position == 0
        world.sessions[sid] = SessionModel()
    if code == OK and op == "delete":
        del world.sessions[sid]


# ---- StreamSteps ----------------------------------------------------------------------------------------

stream_step_specs = st.one_of(step_specs(), valid_step_specs, valid_step_specs)


@settings(max_examples=examples(250), **SETTINGS)
@given(specs=st.lists(stream_step_specs, min_size=1, max_size=5))
def test_fuzz_stream_steps(world: World, specs: list[dict[str, Any]]) -> None:
    """One response per request in order, up to the first failing request, which ends the stream with its status."""
    world.trim()
    requests, plans = [], []
    saved = {sid: SessionModel(m.position, m.last_step) for sid, m in world.sessions.items()}
    first_failure: set | None = None
    for spec in specs:
        if spec["target"][0] == "witness":
            spec = {**spec, "target": ("pool", spec["target"][1], "")}
        request, tokens, why = step_request(world, spec)
        allowed, replay = expect_step(world, request, tokens, why)
        if len(allowed) > 1:  # may or may not be a replay: the stream's course would be unknown
            break
        requests.append(request)
        plans.append((request, tokens, replay))
        if allowed != {OK}:
            first_failure = allowed
            break
        # advance the model as if it ran (positions of later requests depend on it)
        model = world.sessions[request.session_id]
        if not replay:
            model.last_step = (model.position, tuple(tokens or ()))
            model.position += len(tokens or ())
    touched = {r.session_id for r in requests if r.session_id in world.sessions}
    for sid, m in saved.items():  # back to the state before the stream; the responses move it again
        world.sessions[sid] = m
    responses, code, details = drain(world.stub.StreamSteps(iter(requests), timeout=60))
    world.record(code, "StreamSteps", details)
    expected_ok = len(requests) - (1 if first_failure is not None else 0)
    if not requests:
        return
    assert code in (first_failure or {OK}), (code, details)
    if first_failure == {EXHAUSTED}:
        # grpc fails the whole call when a message is over the limit: answers to earlier requests may be lost
        # (the requests may still have run; the refresh below re-reads the positions).
        assert len(responses) <= expected_ok, (len(responses), expected_ok, code, details)
    else:
        assert len(responses) == expected_ok, (len(responses), expected_ok, code, details)
    for (request, tokens, replay), response in zip(plans, responses):
        check_step_response(world, request, tokens or [], replay, response)
    if first_failure is not None:
        for sid in touched:
            world.refresh(sid)


# ---- StreamStepBatches ----------------------------------------------------------------------------------

CODE_OF = {status.value[0]: status for status in grpc.StatusCode}


@settings(max_examples=examples(200), **SETTINGS)
@given(specs=st.lists(stream_step_specs, min_size=1, max_size=6))
def test_fuzz_stream_step_batches(world: World, specs: list[dict[str, Any]]) -> None:
    """All the steps in one message, each with its own result: its code what Step would give, whatever
    fails around it, and the steps of a session applied in order (a failed one changes nothing)."""
    world.trim()
    steps, plans = [], []
    saved = {sid: SessionModel(m.position, m.last_step) for sid, m in world.sessions.items()}
    for step_id, spec in enumerate(specs, 1):
        if spec["target"][0] == "witness":
            spec = {**spec, "target": ("pool", spec["target"][1], "")}
        request, tokens, why = step_request(world, spec)
        allowed, replay = expect_step(world, request, tokens, why)
        if len(allowed) > 1 or allowed == {EXHAUSTED}:  # not sent: its outcome, or the message's, unknown
            continue
        steps.append(pb.TaggedStep(id=step_id, request=request))
        plans.append((step_id, request, tokens, replay, allowed))
        if allowed == {OK} and not replay:  # advance the model as if it ran (later steps depend on it)
            model = world.sessions[request.session_id]
            model.last_step = (model.position, tuple(tokens or ()))
            model.position += len(tokens or ())
    for sid, m in saved.items():  # back to the state before the stream; the results move it again
        world.sessions[sid] = m
    if not steps:
        return
    message = pb.StreamStepBatchesRequest(steps=steps)
    responses, code, details = drain(world.stub.StreamStepBatches(iter([message]), timeout=60))
    world.record(code, "StreamStepBatches", details)
    if message.ByteSize() > MAX_MESSAGE:  # the message as a whole is over the limit: nothing ran
        assert code == EXHAUSTED and not responses, (code, details)
        return
    assert code == OK, (code, details)
    results = {r.id: r for response in responses for r in response.results}
    assert sorted(results) == [step_id for step_id, *_ in plans]  # every step answered, once
    for step_id, request, tokens, replay, allowed in plans:  # in order: the model advances as the server did
        result = results[step_id]
        if result.HasField("response"):
            assert allowed == {OK}, (allowed, request)
            check_step_response(world, request, tokens or [], replay, result.response)
        else:
            error_code = CODE_OF[result.error.code]
            world.record(error_code, "StreamStepBatches step", result.error.message)
            assert error_code in allowed and error_code != OK, (error_code, result.error.message, allowed)
            assert result.error.message
            if error_code == ABORTED:
                assert result.error.position == world.sessions[request.session_id].position


# ---- raw bytes: malformed protobuf, invalid UTF-8, garbage -----------------------------------------------

UNARY, SERVER_STREAM, BIDI = "unary", "server-stream", "bidi"
# method path -> (kind, request class, string field numbers, a well-formed request to mutate)
RAW_ID = "raw~not-a-session-id~0123456789"  # '~' is not an id character: never names a session
METHODS: dict[str, tuple[str, Any, tuple[int, ...], Any]] = {
    SERVICE + "GetModelInfo": (UNARY, pb.GetModelInfoRequest, (), pb.GetModelInfoRequest()),
    SERVICE + "CreateSession": (UNARY, pb.CreateSessionRequest, (2,),
                                pb.CreateSessionRequest(session_id=RAW_ID, ttl_seconds=5)),
    SERVICE + "GetSession": (UNARY, pb.GetSessionRequest, (1,), pb.GetSessionRequest(session_id=RAW_ID)),
    SERVICE + "DeleteSession": (UNARY, pb.DeleteSessionRequest, (1,), pb.DeleteSessionRequest(session_id=RAW_ID)),
    SERVICE + "ResetSession": (UNARY, pb.ResetSessionRequest, (1,), pb.ResetSessionRequest(session_id=RAW_ID)),
    SERVICE + "ForkSession": (UNARY, pb.ForkSessionRequest, (1, 3),
                              pb.ForkSessionRequest(session_id=RAW_ID, ttl_seconds=9, new_session_id=RAW_ID)),
    SERVICE + "Step": (UNARY, pb.StepRequest, (1, 3),
                       pb.StepRequest(session_id=RAW_ID, text="Hello", top_k=3, expected_position=0)),
    SERVICE + "StreamSteps": (BIDI, pb.StepRequest, (1, 3), pb.StepRequest(session_id=RAW_ID, tokens=[1, 2, 3])),
    SERVICE + "StreamStepBatches": (BIDI, pb.StreamStepBatchesRequest, (), pb.StreamStepBatchesRequest(steps=[
        pb.TaggedStep(id=7, request=pb.StepRequest(session_id=RAW_ID, tokens=[1, 2, 3]))])),
    SERVICE + "Generate": (SERVER_STREAM, pb.GenerateRequest, (1, 2, 9),
                           pb.GenerateRequest(session_id=RAW_ID, prompt_text="Hi", max_tokens=3, temperature=0.5,
                                              top_p=0.9, seed=1, stop=["x"])),
    "/grpc.health.v1.Health/Check": (UNARY, health_pb2.HealthCheckRequest, (1,),
                                     health_pb2.HealthCheckRequest(service="lstmserve.v1.LstmService")),
}
BAD_UTF8 = [b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80",
            b"\xe2\x82", b"ok\xc3", b"\xf8\x88\x80\x80\x80"]


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def string_field(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


@st.composite
def raw_payloads(draw: Any, method: str) -> bytes:
    _, _, string_fields, base = METHODS[method]
    valid = base.SerializeToString()
    how = draw(st.sampled_from(["random", "truncate", "flip", "bad-utf8", "bad-utf8", "append", "overlong-varint",
                                "wrong-wire-type", "huge-varint"]))
    if how == "random" or not valid:
        return draw(st.binary(max_size=300))
    if how == "truncate":
        return valid[: draw(st.integers(0, max(len(valid) - 1, 0)))]
    if how == "flip":
        i = draw(st.integers(0, len(valid) - 1))
        return valid[:i] + bytes([valid[i] ^ draw(st.integers(1, 255))]) + valid[i + 1 :]
    if how == "bad-utf8" and string_fields:
        bad = draw(st.sampled_from(BAD_UTF8))
        text = draw(st.text(VOCAB_TEXT, max_size=8)).encode()
        return valid + string_field(draw(st.sampled_from(string_fields)), text + bad + text)
    if how == "wrong-wire-type":  # a known field number with another wire type (or an invalid one: 3, 4, 6, 7)
        number = draw(st.integers(1, 12))
        wire = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]))
        payload = {0: varint(draw(st.integers(0, 2**64 - 1))), 1: b"\x01" * 8, 2: varint(3) + b"abc", 5: b"\x01" * 4}
        return valid + varint(number << 3 | wire) + payload.get(wire, b"")
    if how == "huge-varint":  # 64-bit values in (possibly 32-bit) integer fields
        return valid + varint(draw(st.integers(1, 12)) << 3) + varint(draw(st.sampled_from([2**31, 2**32 - 1,
                                                                                          2**63, 2**64 - 1])))
    if how == "overlong-varint":  # a length prefix that runs past the end
        return valid + varint(draw(st.sampled_from(string_fields or (1,))) << 3 | 2) + varint(2**40)
    return valid + draw(st.binary(min_size=1, max_size=40))


def parses(cls: Any, data: bytes) -> bool:
    try:
        cls.FromString(data)
    except DecodeError:
        return False
    return True


def raw_call(channel: grpc.Channel, method: str, payloads: list[bytes]) -> tuple[Code, str, list[bytes]]:
    kind = METHODS[method][0]
    ident = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    if kind == UNARY:
        code, details, response = unary(channel.unary_unary(method, **ident), payloads[0])
        return code, details, [response] if response is not None else []
    if kind == SERVER_STREAM:
        out, code, details = drain(channel.unary_stream(method, **ident)(payloads[0], timeout=30))
        return code, details, out
    out, code, details = drain(channel.stream_stream(method, **ident)(iter(payloads), timeout=30))
    return code, details, out


@st.composite
def raw_cases(draw: Any) -> tuple[str, list[bytes]]:
    method = draw(st.sampled_from(sorted(METHODS)))
    n = draw(st.integers(1, 3)) if METHODS[method][0] == BIDI else 1
    return method, [draw(raw_payloads(method)) for _ in range(n)]


@settings(max_examples=examples(1000), **SETTINGS)
@given(case=raw_cases())
def test_fuzz_raw_bytes(world: World, case: tuple[str, list[bytes]]) -> None:
    """Bytes that do not parse as the request type are INVALID_ARGUMENT; bytes that do get a proper status."""
    method, payloads = case
    kind, cls, _, _ = METHODS[method]
    code, details, responses = raw_call(world.channel, method, payloads)
    world.record(code, "raw " + method, details)
    if not parses(cls, payloads[0]):
        assert code == INVALID and "malformed request message" in details, (code, details)
        assert not responses
        return
    for data in responses:  # whatever came back is a well-formed response
        name = method.rsplit("/", 1)[1]
        if name in ("CreateSession", "ForkSession"):  # a session made from garbage: not part of the oracle
            created = pb.CreateSessionResponse.FromString(data).session.session_id
            assert not world.known(created)
            world.stub.DeleteSession(pb.DeleteSessionRequest(session_id=created), timeout=30)
    if kind == BIDI and len(payloads) > 1 and code == INVALID:
        return  # a later message may be the malformed one
    assert code in {OK, INVALID, NOT_FOUND, EXISTS, ABORTED}, (code, details)


# ---- oversized messages --------------------------------------------------------------------------------


def sized(method: str, size: int) -> bytes:
    """A request for `method` of exactly `size` bytes (a long string field, or unknown-field padding)."""
    _, cls, string_fields, base = METHODS[method]
    prefix = base.SerializeToString()
    number = string_fields[0] if string_fields else 15  # field 15: unknown to the type, skipped by the parser
    tag = varint(number << 3 | 2)
    for length_bytes in range(1, 6):
        n = size - len(prefix) - len(tag) - length_bytes
        if n >= 0 and len(varint(n)) == length_bytes:
            data = prefix + tag + varint(n) + b"s" * n
            assert len(data) == size and parses(cls, data)
            return data
    raise AssertionError(f"cannot build {size} bytes for {method}")


@settings(max_examples=examples(60), **SETTINGS)
@given(method=st.sampled_from(sorted(METHODS)), delta=st.integers(-3, 3) | st.integers(4, 200_000))
def test_fuzz_message_size_limit(world: World, method: str, delta: int) -> None:
    """Past --max-message-bytes the answer is RESOURCE_EXHAUSTED; at the limit the request is read."""
    data = sized(method, MAX_MESSAGE + delta)
    code, details, _ = raw_call(world.channel, method, [data])
    world.record(code, "oversized " + method, details)
    if delta > 0:
        assert code == EXHAUSTED, (code, details)
        assert "larger than max" in details
    else:
        assert code in {OK, INVALID, NOT_FOUND, EXISTS}, (code, details)


def test_oversized_message_mid_stream(world: World) -> None:
    sid = world.new_session()
    small = pb.StepRequest(session_id=sid, text="Hello").SerializeToString()
    big = pb.StepRequest(session_id=sid, text="x" * (MAX_MESSAGE + 10)).SerializeToString()
    code, details, responses = raw_call(world.channel, SERVICE + "StreamSteps", [small, big, small])
    world.record(code, "oversized stream", details)
    assert code == EXHAUSTED, details
    assert len(responses) <= 1  # the first may have been answered before the big one arrived
    position = world.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=30).session.position
    # The first step may have run with its answer lost when the stream failed: applied at most once.
    assert position in (0, 5) and position >= 5 * len(responses)
    world.sessions[sid].position = position
    world.sessions[sid].last_step = UNKNOWN_LAST


# ---- plain TCP: garbage and half-open connections -----------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def health_ok(target: str, timeout: float = 10) -> bool:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service="lstmserve.v1.LstmService"), timeout=timeout)
        return status.status == health_pb2.HealthCheckResponse.SERVING


@st.composite
def tcp_garbage(draw: Any) -> bytes:
    body = draw(st.binary(min_size=1, max_size=2048))
    prefixes = [b"", H2_PREFACE, H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00",
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x02\x00"]
    return draw(st.sampled_from(prefixes)) + body


@settings(max_examples=examples(150), **SETTINGS)
@given(payload=tcp_garbage(), wait=st.booleans())
def test_fuzz_tcp_garbage(world: World, payload: bytes, wait: bool) -> None:
    """Raw bytes on the gRPC port (after an HTTP/2 preface or not) never take the server down."""
    with socket.create_connection(("127.0.0.1", world.server.port), timeout=5) as sock:
        try:
            sock.sendall(payload)
            if wait:  # read what the server answers (GOAWAY, an HTTP/1 error...) until it closes or goes quiet
                sock.settimeout(0.3)
                while sock.recv(65536):
                    pass
        except (TimeoutError, ConnectionError):
            pass
    world.codes["tcp-garbage"] += 1
    if world.codes["tcp-garbage"] % 25 == 0:
        assert health_ok(world.server.target)


def test_half_open_connections_do_not_block_service(world: World) -> None:
    """64 connections that send nothing, half a preface, a preface and half a frame, or half-close, held open
    while real calls run: the calls are served promptly; afterwards the server is still healthy."""
    socks = []
    try:
        for i in range(64):
            s = socket.create_connection(("127.0.0.1", world.server.port), timeout=5)
            kind = i % 4
            if kind == 1:
                s.sendall(H2_PREFACE[:10])
            elif kind == 2:
                s.sendall(H2_PREFACE + b"\x00\x00\x12\x04")  # a SETTINGS frame header, no payload
            elif kind == 3:
                s.sendall(H2_PREFACE[:5])
                s.shutdown(socket.SHUT_WR)
            socks.append(s)
        started = time.monotonic()
        assert health_ok(world.server.target, timeout=5)
        sid = world.new_session()
        response = world.stub.Step(pb.StepRequest(session_id=sid, text="Who is there?"), timeout=5)
        assert response.position == 13
        world.sessions[sid] = SessionModel(13, (0, tuple(encode("Who is there?") or ())))
        tokens = list(world.stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=4, seed=3), timeout=5))
        assert len(tokens) == 4
        world.sessions[sid] = SessionModel(17, None)
        assert time.monotonic() - started < 5
    finally:
        for s in socks:
            s.close()
    world.codes["half-open"] += len(socks)
    assert health_ok(world.server.target)


# ---- after the run ----------------------------------------------------------------------------------------


def test_zz_after_the_run_server_is_healthy_and_witnesses_match_offline(world: World, tiny_checkpoint: Path) -> None:
    """Runs last in this module (file order): checks what the fuzz must not have damaged."""
    w = world.witnesses
    w.stop()
    assert not w.errors, w.errors[:5]
    assert health_ok(world.server.target)
    engine = world.server.engine
    deadline = time.monotonic() + 10
    while (engine.scheduler.queued_items or engine.scheduler.queued_tokens) and time.monotonic() < deadline:
        time.sleep(0.05)
    # Nothing is left queued and no token was leaked from the admission count.
    assert engine.scheduler.queued_items == 0 and engine.scheduler.queued_tokens == 0
    # Every fuzz session is where the oracle says: refused calls changed nothing.
    for sid, model in world.sessions.items():
        position = world.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=30).session.position
        assert position == model.position, sid[:8]
    ckpt = load_checkpoint(tiny_checkpoint)
    tail = encode(" and so, farewell.") or []
    for sid in w.ids:
        assert len(w.fed[sid]) > 100  # it was fed before and during the run
        response = w.stub.Step(pb.StepRequest(session_id=sid, tokens=tail, return_logprobs=True), timeout=30)
        w.fed[sid].extend(tail)
        w.logprobs[sid].append(np.array([list(o.logprobs) for o in response.outputs], dtype=np.float32))
        assert response.position == len(w.fed[sid])
        served = np.concatenate(w.logprobs[sid])
        expected = offline_logprobs(ckpt, w.fed[sid])
        assert served.shape == expected.shape
        assert np.abs(served - expected).max() <= TOL
    total = sum(v for k, v in world.codes.items())
    print(f"\nfuzz: {total} cases; status codes: {dict(world.codes)}")
    assert not set(world.codes) & {c.name for c in NEVER_FOR_A_CALLER}


# ---- checkpoints on disk: corrupt, truncated, tampered ----------------------------------------------


def _rewrite_hash(directory: Path) -> None:
    meta_path = directory / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["weights_sha256"] = sha256_file(directory / "model.safetensors")
    meta_path.write_text(json.dumps(meta))


def _header(data: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _with_header(header: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _retensor(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path))
    change(weights)
    save_file(weights, str(path), metadata={"format": "lstm-serve-checkpoint"})


def _set_first_offsets(data: bytes) -> bytes:
    header, body = _header(data)
    name = next(k for k in header if k != "__metadata__")
    header[name] = {**header[name], "data_offsets": [0, 10**9]}
    return _with_header(header, body)


TAMPERING: dict[str, tuple[Callable[[Path], None], str]] = {
    # (what is done to model.safetensors before model.json's hash is recomputed to match, expected message)
    "truncated-half": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "unreadable"),
    "truncated-last-byte": (lambda p: p.write_bytes(p.read_bytes()[:-1]), "unreadable"),
    "truncated-to-header-length": (lambda p: p.write_bytes(p.read_bytes()[:5]), "unreadable"),
    "empty": (lambda p: p.write_bytes(b""), "unreadable"),
    "header-length-huge": (lambda p: p.write_bytes(struct.pack("<Q", 2**62) + p.read_bytes()[8:]), "unreadable"),
    "offsets-past-end": (lambda p: p.write_bytes(_set_first_offsets(p.read_bytes())), "unreadable"),
    "trailing-garbage": (lambda p: p.write_bytes(p.read_bytes() + b"\x00garbage"), "unreadable"),
    "wrong-shape": (lambda p: _retensor(p, lambda w: w.update({"head.bias": torch.zeros(64)})), "has shape"),
    "missing-tensor": (lambda p: _retensor(p, lambda w: w.pop("head.bias")), "do not match"),
    "nan-weight": (lambda p: _retensor(p, lambda w: w["head.bias"].__setitem__(0, float("nan"))), "not finite"),
    "int-weights": (lambda p: _retensor(p, lambda w: w.update({"head.bias": torch.zeros(65, dtype=torch.int32)})),
                    "not finite floating point"),
}


def _tampered(tiny_checkpoint: Path, tmp_path: Path, name: str) -> Path:
    bad = tmp_path / name
    shutil.copytree(tiny_checkpoint, bad)
    TAMPERING[name][0](bad / "model.safetensors")
    _rewrite_hash(bad)
    return bad


def test_truncated_checkpoint_with_matching_hash_refuses_to_start(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The real command: a truncated (or reshaped) model.safetensors whose hash in model.json was recomputed
    to match exits 2 with a message naming the file and the problem, and no traceback."""
    procs = {}
    for name in ("truncated-half", "wrong-shape"):
        bad = _tampered(tiny_checkpoint, tmp_path, name)
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "service.server", "--checkpoint", str(bad), "--port", "0", "--metrics-port", "-1",
             "--durability", "none"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, stderr[-2000:])
        assert str(tmp_path / name / "model.safetensors") in stderr, (name, stderr[-2000:])
        assert TAMPERING[name][1] in stderr and "refusing to start" in stderr, (name, stderr[-2000:])
        assert "Traceback" not in stderr, (name, stderr[-2000:])


@pytest.mark.parametrize("name", sorted(TAMPERING))
def test_tampered_checkpoints_refuse_to_start(tiny_checkpoint: Path, tmp_path: Path, name: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """Every kind of damage, through the server's startup path (serve() returns the exit status 2)."""
    import asyncio
    import dataclasses

    from service.config import ServerConfig
    from service.server import serve

    bad = _tampered(tiny_checkpoint, tmp_path, name)
    config = dataclasses.replace(ServerConfig(), checkpoint=str(bad), port=0, metrics_port=-1, durability="none")
    with caplog.at_level("ERROR", logger="lstm_serve.server"):
        assert asyncio.run(serve(config)) == 2
    message = " ".join(r.getMessage() for r in caplog.records if r.name == "lstm_serve.server")
    assert "refusing to start" in message and str(bad / "model.safetensors") in message, message
    assert TAMPERING[name][1] in message, message
