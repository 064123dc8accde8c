"""service/wire.py: large StepResponses built as wire bytes equal the ones built field by field."""

from __future__ import annotations

import numpy as np
import pytest
from lstmserve_client.proto import lstm_service_pb2 as pb

from service import wire
from service.engine import StepResult
from service.server import _listed_step_response


def result(rng: np.random.Generator, n: int, vocab: int, k: int, logprobs: bool, hidden: int,
           session_id: str = "s" * 22, position: int = 7) -> StepResult:
    tokens = rng.integers(0, vocab, n).tolist()
    tokens[0] = 0  # proto3's default value: omitted by the canonical encoding
    values = rng.standard_normal((n, vocab)).astype(np.float32)
    specials = [-np.inf, -0.0, 1e-42][:vocab]  # (1e-42: a denormal)
    values[0, : len(specials)] = specials
    return StepResult(
        session_id=session_id,
        position=position,
        tokens=tokens,
        top_tokens=rng.integers(0, vocab, (n, k)).astype(np.int64) if k else None,
        top_logprobs=values[:, :k].copy() if k else None,
        logprobs=values if logprobs else None,
        hidden=rng.standard_normal((n, hidden)).astype(np.float32) if hidden else None,
    )


@pytest.mark.parametrize("n", [1, 3, 257])  # (step_response is exact at any size; fits() picks when)
@pytest.mark.parametrize("vocab", [2, 65, 300, wire.MAX_ID])
@pytest.mark.parametrize(("k", "logprobs", "hidden"), [(0, True, 0), (5, True, 0), (1, False, 7), (3, True, 130),
                                                       (0, False, 600)])
def test_wire_bytes_parse_to_the_message_built_field_by_field(n: int, vocab: int, k: int, logprobs: bool,
                                                               hidden: int) -> None:
    rng = np.random.default_rng(n * 1000 + vocab + k)
    r = result(rng, n, vocab, min(k, vocab), logprobs, hidden)
    if k and vocab > 1:
        r.top_tokens[-1, -1] = vocab - 1  # the largest id takes the most varint bytes
    r.tokens[-1] = vocab - 1
    fast = wire.step_response(r)
    listed = _listed_step_response(pb.StepResponse(session_id=r.session_id, position=r.position), r)
    assert fast == listed
    assert fast.SerializeToString() == listed.SerializeToString()  # what gRPC sends: canonical again
    assert np.signbit(fast.outputs[0].logprobs[1]) if logprobs else True  # -0.0 kept


@pytest.mark.parametrize("position", [0, 1, 2**40])
def test_the_header_fields(position: int) -> None:
    r = result(np.random.default_rng(1), 2, 65, 5, True, 0, session_id="abc-_" * 10, position=position)
    fast = wire.step_response(r)
    assert fast.session_id == "abc-_" * 10 and fast.position == position and len(fast.outputs) == 2


def test_which_results_take_the_wire_path() -> None:
    rng = np.random.default_rng(2)
    assert not wire.fits(result(rng, 16, 65, 5, False, 0))  # small: the list path
    assert not wire.fits(result(rng, 1, 65, 5, True, 0))
    assert wire.fits(result(rng, 64, 65, 5, False, 0))  # 64 x (1 + 5 + 5) values
    assert wire.fits(result(rng, 8, 65, 5, True, 0)) and wire.fits(result(rng, 4, 65, 0, False, 512))
    too_large = result(rng, 8, 65, 5, True, 0)
    too_large.tokens[1] = wire.MAX_ID  # does not fit ID_WIDTH: the list path
    assert not wire.fits(too_large)


# ---- the common answer (top-k only) encoded ahead: wire.top_k_answer ------------------------------


@pytest.mark.parametrize("n", [wire.MIN_TOP_K_TOKENS, 16, 64])
@pytest.mark.parametrize("k", [1, 5, wire.MAX_TOP_K])
@pytest.mark.parametrize(("session_id", "position"), [("s" * 22, 7), ("", 0), ("x" * 200, 2**40)])
def test_top_k_answers_are_the_bytes_serialize_gives(n: int, k: int, session_id: str, position: int) -> None:
    r = result(np.random.default_rng(n * 100 + k), n, 65, k, False, 0, session_id=session_id, position=position)
    r.top_tokens[-1, -1], r.tokens[-1] = 127, 127  # the largest one-byte ids
    r.top_logprobs[1, 0] = np.nan  # any float goes through as its 4 bytes
    listed = _listed_step_response(pb.StepResponse(session_id=r.session_id, position=r.position), r)
    encoded = wire.top_k_answer(r)
    assert encoded == listed.SerializeToString()  # byte for byte: r.tokens[0] == 0 is omitted, as proto3 does
    parsed = pb.StepResponse.FromString(encoded)
    assert parsed.session_id == session_id and parsed.position == position and len(parsed.outputs) == n


def test_answers_the_top_k_encoding_leaves_to_the_message() -> None:
    rng = np.random.default_rng(3)

    def top_k_only(n: int, k: int = 5) -> StepResult:
        return result(rng, n, 65, k, False, 0)

    assert wire.top_k_answer(top_k_only(16)) is not None
    assert wire.top_k_answer(top_k_only(wire.MIN_TOP_K_TOKENS - 1)) is None  # the message is cheaper
    assert wire.top_k_answer(top_k_only(16, k=wire.MAX_TOP_K + 1)) is None  # a TokenOutput of 128 bytes or more
    assert wire.top_k_answer(result(rng, 16, 65, 0, False, 0)) is None  # no top-k asked
    assert wire.top_k_answer(result(rng, 16, 65, 5, True, 0)) is None  # log-probabilities asked
    assert wire.top_k_answer(result(rng, 16, 65, 5, False, 8)) is None  # hidden states asked
    wide = top_k_only(16)
    wide.top_tokens[3, 2] = 128  # a two-byte varint
    assert wire.top_k_answer(wide) is None
    wide = top_k_only(16)
    wide.tokens[5] = 300
    assert wire.top_k_answer(wide) is None


def test_encoded_answers_pass_the_serializer_as_they_are() -> None:
    serialize = wire.passing_bytes(pb.StepResponse.SerializeToString)
    message = pb.StepResponse(session_id="abc", position=3)
    assert serialize(message) == message.SerializeToString()
    assert serialize(b"\x10\x03") == b"\x10\x03"
