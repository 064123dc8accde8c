"""StepResponses built as wire bytes from the arrays: large ones, and the common top-k answer.

Filling such a response from Python lists (one float object per value) took ~60 ms for 4096
tokens with log-probabilities and ~300 ms with the hidden states of a 2x512 model, on the one
event-loop thread: no other call was answered meanwhile, so one client's large answers put
hundreds of milliseconds on every other client's tail (and 4096 tokens with top-5, ~10 ms
each). Here the whole answer is one numpy array filled block by block and parsed into the
message (upb: ~4 ms for 9.6 MB). Small answers, the common kind, keep the list path in
server.py (below MIN_VALUES).

The common answer of several tokens (top-k only, as a streaming client asks) is encoded ahead
as well, by top_k_answer: byte for byte what SerializeToString would give, handed to gRPC as
bytes (passing_bytes), with no message object built: 13 against 24 µs for 16 tokens with top-5,
on the event-loop thread that every answer of a step waits for (docs/performance.md, "Top-k
answers encoded ahead": +4 % tokens/s at 64 sessions in 16-token chunks).

The encoding is protobuf's (proto3, packed repeated fields) for lstmserve.v1.TokenOutput
{ int32 token = 1; repeated int32 top_tokens = 2; repeated float top_logprobs = 3;
repeated float logprobs = 4; repeated float hidden = 5; } inside StepResponse.outputs = 3.
tests/test_wire.py checks the parsed message against the list-built one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from lstmserve_client.proto import lstm_service_pb2 as pb

from service.engine import StepResult

# Every varint is written at a fixed width, with redundant continuation bytes (a protobuf
# parser accepts up to 10; the message parsed from these bytes is re-encoded canonically when
# gRPC sends it), so that every TokenOutput has the same layout and the whole response is one
# numpy array filled column block by column block.
ID_WIDTH = 2  # token ids below 2**14
LENGTH_WIDTH = 4  # lengths below 2**28
MAX_ID = 1 << (7 * ID_WIDTH)

# Tags: (field number << 3) | wire type (0 varint, 2 length-delimited).
_TOKEN, _TOP_TOKENS, _TOP_LOGPROBS, _LOGPROBS, _HIDDEN = 0x08, 0x12, 0x1A, 0x22, 0x2A
_SESSION_ID, _POSITION, _OUTPUT = 0x0A, 0x10, 0x1A  # StepResponse.session_id, .position, .outputs


def _padded_varints(values: np.ndarray, width: int) -> np.ndarray:
    """[..., width] uint8: each non-negative value as a varint of exactly `width` bytes."""
    v = values.astype(np.int64)[..., None] >> (7 * np.arange(width, dtype=np.int64))
    out = (v & 0x7F).astype(np.uint8)
    out[..., :-1] |= 0x80
    return out


# Below this many values in an answer the list path is faster (this one costs ~60 µs to set
# up; lists ~0.2 µs per value): a one-token top-5 answer, the most common kind, 5.0 against
# 62 µs; 64 tokens with top-5, 120 against 75 µs; 4096 tokens, 9.5 against 1.4 ms.
MIN_VALUES = 512


def fits(result: StepResult) -> bool:
    """Whether to use this encoding: a large answer, and token ids that fit ID_WIDTH (any
    character vocabulary does)."""
    n = len(result.tokens)
    if n < 32 and result.logprobs is None and result.hidden is None:  # (the common answers: one test)
        return False
    per_token = 1 + sum(a.shape[1] for a in (result.top_tokens, result.top_logprobs, result.logprobs, result.hidden)
                        if a is not None)
    if n * per_token < MIN_VALUES:
        return False
    top = result.top_tokens
    return max(result.tokens) < MAX_ID and (top is None or top.size == 0 or int(top.max()) < MAX_ID)


def step_response(result: StepResult) -> pb.StepResponse:
    """The message server._step_response builds, for a result that `fits`."""
    n = len(result.tokens)
    blocks: list[tuple[int, np.ndarray, bool]] = []  # (tag, [n, m] bytes, a packed repeated field)
    blocks.append((_TOKEN, _padded_varints(np.asarray(result.tokens, np.int64), ID_WIDTH), False))
    if result.top_tokens is not None and result.top_tokens.shape[1]:
        blocks.append((_TOP_TOKENS, _padded_varints(result.top_tokens, ID_WIDTH).reshape(n, -1), True))
    for tag, array in ((_TOP_LOGPROBS, result.top_logprobs), (_LOGPROBS, result.logprobs), (_HIDDEN, result.hidden)):
        if array is not None and array.shape[1]:  # (proto3 writes no empty repeated field)
            blocks.append((tag, np.ascontiguousarray(array, "<f4").view(np.uint8).reshape(n, -1), True))
    # Row layout: tag, length (for a repeated field), the bytes; then the row's own header.
    body = sum(1 + (LENGTH_WIDTH if packed else 0) + data.shape[1] for _, data, packed in blocks)
    row = 1 + LENGTH_WIDTH + body
    rows = np.empty((n, row), np.uint8)
    rows[:, 0] = _OUTPUT
    rows[:, 1 : 1 + LENGTH_WIDTH] = _padded_varints(np.array(body), LENGTH_WIDTH)
    at = 1 + LENGTH_WIDTH
    for tag, data, packed in blocks:
        rows[:, at] = tag
        at += 1
        if packed:  # its length in bytes
            rows[:, at : at + LENGTH_WIDTH] = _padded_varints(np.array(data.shape[1]), LENGTH_WIDTH)
            at += LENGTH_WIDTH
        rows[:, at : at + data.shape[1]] = data
        at += data.shape[1]
    head = pb.StepResponse(session_id=result.session_id, position=result.position).SerializeToString()
    return pb.StepResponse.FromString(head + rows.tobytes())


# ---- the common answer as bytes ---------------------------------------------------------------

# From this many tokens the bytes below are cheaper than a message built and serialized (16
# tokens with top-5: 13 against 24 µs; one token: 5.5 against 2.5 µs).
MIN_TOP_K_TOKENS = 4
_ONE_BYTE = 0x7F  # the largest value a one-byte varint holds
# The largest k whose TokenOutput (6 + 5k bytes with its token: three tags, the token, two
# lengths, k ids, k floats) keeps a one-byte length.
MAX_TOP_K = (_ONE_BYTE - 6) // 5


def varint(value: int) -> bytes:
    out = bytearray()
    while value > _ONE_BYTE:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def top_k_answer(result: StepResult) -> bytes | None:
    """The encoded StepResponse of a top-k-only answer of several tokens, byte for byte what
    SerializeToString gives for the message (tests/test_wire.py), or None where that message is
    cheaper or the layout below does not hold: every id a one-byte varint, every TokenOutput
    shorter than 128 bytes (k <= MAX_TOP_K). gRPC sends the bytes as they are (passing_bytes)."""
    top_t, top_l = result.top_tokens, result.top_logprobs
    tokens = result.tokens
    if result.logprobs is not None or result.hidden is not None or top_t is None or top_l is None:
        return None
    k = top_t.shape[1]
    if len(tokens) < MIN_TOP_K_TOKENS or not 0 < k <= MAX_TOP_K:
        return None
    if max(tokens) > _ONE_BYTE or min(tokens) < 0 or int(top_t.max()) > _ONE_BYTE or int(top_t.min()) < 0:
        return None
    ids = top_t.astype(np.uint8).tobytes()
    logprobs = np.ascontiguousarray(top_l, "<f4").tobytes()
    top_head, logprob_head = bytes((_TOP_TOKENS, k)), bytes((_TOP_LOGPROBS, 4 * k))
    body = 4 + 5 * k  # the two packed fields with their tags and lengths
    with_token, without_token = bytes((_OUTPUT, body + 2, _TOKEN)), bytes((_OUTPUT, body))  # (proto3 omits a 0)
    session_id = result.session_id.encode()
    parts = [
        bytes((_SESSION_ID,)) + varint(len(session_id)) + session_id if session_id else b"",
        bytes((_POSITION,)) + varint(result.position) if result.position else b"",
    ]
    append = parts.append
    for i, token in enumerate(tokens):
        top, lp = ids[i * k : (i + 1) * k], logprobs[4 * i * k : 4 * (i + 1) * k]
        if token:
            append(with_token + bytes((token,)) + top_head + top + logprob_head + lp)
        else:
            append(without_token + top_head + top + logprob_head + lp)
    return b"".join(parts)


def passing_bytes(serializer: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """A handler's response serializer that sends an answer already encoded (top_k_answer) as it is."""

    def serialize(message: Any) -> bytes:
        return message if type(message) is bytes else serializer(message)

    return serialize
