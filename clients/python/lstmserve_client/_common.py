"""Shared internals of the sync and asyncio clients: request building and validation,
protobuf <-> dataclass conversion, channel options and credentials, retry decisions.

Nothing here is public API.
"""

from __future__ import annotations

import datetime as _dt
import math
import operator
import secrets
import time
from collections.abc import Sequence
from typing import Any

import grpc

from ._version import __version__
from .datatypes import (
    GeneratedToken,
    ModelInfo,
    RetryPolicy,
    ServerLimits,
    SessionInfo,
    StepResult,
    TlsConfig,
    TokenOutput,
)
from .errors import DeadlineExceeded, InvalidInput, LstmServeError, ResourceExhausted, from_rpc_error
from .proto import lstm_service_pb2 as pb

# A step's input: text (encoded by the server with the model's vocabulary) or token ids.
StepInput = str | Sequence[int]

INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1
# Sessions of one server are addressed by ids of >= 128 random bits, URL-safe.
SESSION_ID_BYTES = 16

_CELL_TYPES = {pb.CELL_TYPE_LSTM: "lstm", pb.CELL_TYPE_GRU: "gru"}
_FINISH_REASONS = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_CANCELLED: "cancelled",
}

MAX_RECEIVE_MESSAGE_BYTES = 256 * 1024 * 1024
AUTHORIZATION_HEADER = "authorization"


def new_session_id() -> str:
    """A fresh client-proposed session id: 128 random bits, base64url (22 characters)."""
    return secrets.token_urlsafe(SESSION_ID_BYTES)


# --------------------------------------------------------------------------- validation


def check_timeout(timeout: float | None, name: str = "timeout") -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, got {type(timeout).__name__}")
    if math.isnan(timeout) or timeout <= 0:
        raise InvalidInput(f"{name} must be > 0 seconds, got {timeout!r}")
    if math.isinf(timeout):
        return None
    return float(timeout)


def check_ttl(ttl: float | None) -> int | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(f"ttl must be a number of seconds or None, got {type(ttl).__name__}")
    if not math.isfinite(ttl) or ttl < 1 or ttl > INT32_MAX:
        raise InvalidInput(f"ttl must be between 1 and {INT32_MAX} seconds, got {ttl!r}")
    return int(math.ceil(ttl))


def check_session_id(session_id: str) -> str:
    if not isinstance(session_id, str):
        raise TypeError(f"session_id must be a str, got {type(session_id).__name__}")
    if not session_id:
        raise InvalidInput("session_id must not be empty")
    return check_text(session_id, "session_id")


def check_text(text: str, name: str) -> str:
    """text, if protobuf can send it: a str with a lone surrogate (what os.fsdecode and
    sys.argv make of undecodable bytes) is not UTF-8 and would fail deep inside protobuf."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInput(
            f"{name} is not valid Unicode: {text[e.start:e.end]!a} at index {e.start} is a lone surrogate"
        ) from None
    return text


def _check_int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if not lo <= v <= hi:
        raise InvalidInput(f"{name} must be between {lo} and {hi}, got {v}")
    return v


def check_tokens(tokens: Any, name: str = "tokens") -> list[int]:
    """Token ids as a list of ints (ids the vocabulary lacks are left for the server to reject)."""
    if isinstance(tokens, (str, bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be a sequence of ints")
    try:
        items = list(tokens)
    except TypeError:
        raise TypeError(f"{name} must be a str or a sequence of ints, got {type(tokens).__name__}") from None
    return [_check_int(t, f"{name}[{i}]", 0, INT32_MAX) for i, t in enumerate(items)]


def split_input(value: Any) -> tuple[str | None, list[int] | None, int]:
    """(text, tokens, token count) of a step input; exactly one of text and tokens is set."""
    if isinstance(value, str):
        # The vocabulary is character-level: one character, one token.
        return check_text(value, "input"), None, len(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError("input must be a str or a sequence of ints, not bytes (decode it first)")
    if isinstance(value, (int, float)) or value is None:
        raise TypeError(f"input must be a str or a sequence of ints, got {type(value).__name__}")
    tokens = check_tokens(value, "tokens")
    return None, tokens, len(tokens)


def check_top_k(top_k: int) -> int:
    return _check_int(top_k, "top_k", 0, INT32_MAX)


def check_step_top_k(top_k: int | None) -> int | None:
    """A step's top_k; None leaves it unset: the server's default (5, or the whole
    vocabulary if it has fewer tokens)."""
    return None if top_k is None else check_top_k(top_k)


def step_request(
    session_id: str,
    value: StepInput,
    *,
    expected_position: int,
    top_k: int | None,
    return_logprobs: bool,
    return_hidden: bool,
) -> tuple[pb.StepRequest, int]:
    """A StepRequest and the number of tokens it feeds."""
    text, tokens, n = split_input(value)
    req = pb.StepRequest(
        session_id=session_id,
        expected_position=expected_position,
        return_logprobs=bool(return_logprobs),
        return_hidden=bool(return_hidden),
    )
    if top_k is not None:
        req.top_k = top_k
    if text is not None:
        req.text = text
    else:
        assert tokens is not None
        req.tokens.extend(tokens)
    return req, n


def generate_request(
    session_id: str,
    prompt: StepInput | None,
    *,
    expected_position: int,
    max_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    stop: str | Sequence[str],
) -> pb.GenerateRequest:
    max_tokens = _check_int(max_tokens, "max_tokens", 1, INT32_MAX)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError("temperature must be a number")
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidInput(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    top_k = check_top_k(top_k)
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
        raise TypeError("top_p must be a number")
    if not (0.0 < top_p <= 1.0):
        raise InvalidInput(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(stop, str):
        stops = [stop]
    else:
        stops = list(stop)
        for s in stops:
            if not isinstance(s, str):
                raise TypeError(f"stop strings must be str, got {type(s).__name__}")
    if any(not s for s in stops):
        raise InvalidInput("stop strings must not be empty")
    for s in stops:
        check_text(s, "stop string")
    req = pb.GenerateRequest(
        session_id=session_id,
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_k=top_k,
        top_p=float(top_p),
        stop=stops,
        expected_position=expected_position,
    )
    if seed is not None:
        req.seed = _check_int(seed, "seed", 0, UINT64_MAX)
    if prompt is not None:
        text, tokens, _ = split_input(prompt)
        if text is not None:
            req.prompt_text = text
        else:
            assert tokens is not None
            req.prompt_tokens.extend(tokens)
    return req


def prompt_length(prompt: StepInput | None) -> int:
    return 0 if prompt is None else split_input(prompt)[2]


# --------------------------------------------------------------------------- conversion


def _timestamp(ts: Any, present: bool) -> _dt.datetime | None:
    if not present:
        return None
    return _dt.datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=_dt.timezone.utc)


def session_info(msg: pb.Session) -> SessionInfo:
    return SessionInfo(
        session_id=msg.session_id,
        position=int(msg.position),
        create_time=_timestamp(msg.create_time, msg.HasField("create_time")),
        expire_time=_timestamp(msg.expire_time, msg.HasField("expire_time")),
        ttl_seconds=int(msg.ttl_seconds),
    )


def model_info(msg: pb.GetModelInfoResponse) -> ModelInfo:
    lim = msg.limits
    return ModelInfo(
        vocab=list(msg.vocab),
        cell_type=_CELL_TYPES.get(msg.cell_type, "unspecified"),
        num_layers=int(msg.num_layers),
        hidden_size=int(msg.hidden_size),
        embedding_size=int(msg.embedding_size),
        checkpoint_sha256=msg.checkpoint_sha256,
        val_loss=float(msg.val_loss),
        device=msg.device,
        dtype=msg.dtype,
        limits=ServerLimits(
            max_sessions=lim.max_sessions,
            max_tokens_per_request=lim.max_tokens_per_request,
            max_generate_tokens=lim.max_generate_tokens,
            max_message_bytes=lim.max_message_bytes,
            default_ttl_seconds=lim.default_ttl_seconds,
            max_ttl_seconds=lim.max_ttl_seconds,
            max_batch_sessions=lim.max_batch_sessions,
            max_batch_tokens=lim.max_batch_tokens,
            max_queued_tokens=lim.max_queued_tokens,
        ),
        server_version=msg.server_version,
    )


def _decode(vocab: Sequence[str], token: int) -> str:
    return vocab[token] if 0 <= token < len(vocab) else ""


def step_result(msg: pb.StepResponse, vocab: Sequence[str]) -> StepResult:
    outputs = []
    for o in msg.outputs:
        top = list(o.top_tokens)
        outputs.append(
            TokenOutput(
                token=int(o.token),
                text=_decode(vocab, o.token),
                top_tokens=top,
                top_texts=[_decode(vocab, t) for t in top],
                top_logprobs=list(o.top_logprobs),
                logprobs=list(o.logprobs) if len(o.logprobs) else None,
                hidden=list(o.hidden) if len(o.hidden) else None,
            )
        )
    return StepResult(session_id=msg.session_id, position=int(msg.position), outputs=outputs)


def generated_token(msg: pb.GenerateResponse) -> GeneratedToken:
    return GeneratedToken(
        token=int(msg.token),
        text=msg.text,
        logprob=float(msg.logprob),
        position=int(msg.position),
        finish_reason=_FINISH_REASONS.get(msg.finish_reason),
    )


# --------------------------------------------------------------------------- channel


def channel_options(tls: TlsConfig | None, extra: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    opts: list[tuple[str, Any]] = [
        ("grpc.primary_user_agent", f"lstm-serve-client-python/{__version__}"),
        ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
        # Retries are done by this client (with expected_position); keep gRPC's own off.
        ("grpc.enable_retries", 0),
    ]
    if tls is not None and tls.server_name_override:
        opts.append(("grpc.ssl_target_name_override", tls.server_name_override))
        opts.append(("grpc.default_authority", tls.server_name_override))
    opts.extend(extra)
    return opts


def normalize_tls(tls: TlsConfig | bool | None) -> TlsConfig | None:
    if tls is None or tls is False:
        return None
    if tls is True:
        return TlsConfig()
    if not isinstance(tls, TlsConfig):
        raise TypeError(f"tls must be a TlsConfig, True or None, got {type(tls).__name__}")
    return tls


def channel_credentials(tls: TlsConfig, token: str | None) -> Any:
    creds = grpc.ssl_channel_credentials(
        root_certificates=tls.root_certificates,
        private_key=tls.private_key,
        certificate_chain=tls.certificate_chain,
    )
    if token:
        # "authorization: Bearer <token>" on every call of the channel.
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return creds


def call_metadata(
    token: str | None, tls: TlsConfig | None, extra: Sequence[tuple[str, str | bytes]]
) -> tuple[tuple[str, str | bytes], ...]:
    md: list[tuple[str, str | bytes]] = []
    token = check_token(token)  # (checked here for the channel credentials too: called first)
    if token and tls is None:
        # Call credentials need a secure channel; over plaintext (local testing) the token
        # travels as per-call metadata instead.
        md.append((AUTHORIZATION_HEADER, f"Bearer {token}"))
    for key, value in extra:
        md.append(check_metadata_entry(key, value))
    return tuple(md)


def check_token(token: str | None) -> str | None:
    """A bearer token travels as a header value: printable ASCII only (gRPC refuses anything
    else on every call, as INTERNAL "Invalid metadata")."""
    if token is None:
        return None
    if not isinstance(token, str):
        raise TypeError(f"token must be a str or None, got {type(token).__name__}")
    if not _printable_ascii(token) or token != token.strip():
        raise InvalidInput("token must be printable ASCII with no leading or trailing spaces")
    return token


def check_metadata_entry(key: Any, value: Any) -> tuple[str, Any]:
    """One (key, value) of extra call metadata, as gRPC accepts it: keys are lowercase letters,
    digits and "-_."; "-bin" keys take bytes, the others printable ASCII text."""
    if not isinstance(key, str):
        raise TypeError(f"metadata keys must be str, got {type(key).__name__}")
    name = key.lower()
    if not name or not all(ch in _METADATA_KEY_CHARS for ch in name) or name.startswith("grpc-"):
        raise InvalidInput(
            f"metadata key {key!r} is not allowed: use lowercase letters, digits and '-_.' (not 'grpc-...')"
        )
    if name.endswith("-bin"):
        if not isinstance(value, bytes):
            raise TypeError(f"metadata key {key!r} ends in '-bin' and takes bytes, got {type(value).__name__}")
    elif not isinstance(value, str):
        raise TypeError(f"metadata value of {key!r} must be a str, got {type(value).__name__}")
    elif not _printable_ascii(value):
        raise InvalidInput(f"metadata value of {key!r} must be printable ASCII (use a '-bin' key for bytes)")
    return name, value


_METADATA_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def _printable_ascii(text: str) -> bool:
    return all(" " <= ch <= "~" for ch in text)


# --------------------------------------------------------------------------- retries


class Deadline:
    """The overall deadline of one call, shared by its attempts."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.at = None if timeout is None else time.monotonic() + timeout
        self.attempts = 0

    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at

    def remaining(self) -> float | None:
        if self.at is None:
            return None
        return self.at - time.monotonic()

    def attempt_timeout(self) -> float | None:
        """The timeout of the next attempt; raises DeadlineExceeded when none is left."""
        rem = self.remaining()
        self.attempts += 1
        if rem is None:
            return None
        if rem <= 0:
            when = "before the call could be retried" if self.attempts > 1 else "before the call was made"
            raise DeadlineExceeded(f"deadline of {self.timeout:g}s exceeded {when}")
        return rem

    def sync_timeout(self) -> float | None:
        """The time left, for a helper call made on the way (never <= 0)."""
        rem = self.remaining()
        return None if rem is None else max(rem, 0.001)

    def allows_wait(self, delay: float) -> bool:
        rem = self.remaining()
        return rem is None or delay < rem


def retry_delay(err: LstmServeError, attempt: int, policy: RetryPolicy, deadline: Deadline) -> float | None:
    """Seconds to wait before retrying after attempt number ``attempt`` failed with
    ``err``, or None when the call must not be retried."""
    if err.code not in policy.codes or attempt >= policy.max_attempts:
        return None
    delay = policy.backoff(attempt)
    if isinstance(err, ResourceExhausted) and err.retry_after is not None:
        delay = max(delay, err.retry_after)
    if not deadline.allows_wait(delay):
        return None
    return delay


# Re-reading a session's position after a broken stream: up to this many extra reads,
# this many seconds apart, until two agree.
SETTLE_READS = 10
SETTLE_INTERVAL = 0.02

# Codes with which the server refuses a request before applying anything to the session.
REFUSED_CODES = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ABORTED",
        "ALREADY_EXISTS",
        "RESOURCE_EXHAUSTED",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "FAILED_PRECONDITION",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
    }
)


def streaming_error(e: grpc.RpcError, deadline: Deadline) -> LstmServeError:
    """The client error of a failed streaming call. grpc.aio sometimes ends a stream whose own
    deadline passed with INTERNAL ("Internal error from Core") or CANCELLED instead of
    DEADLINE_EXCEEDED; past the deadline those are reported as what they are."""
    err = from_rpc_error(e)
    if err.code in ("INTERNAL", "CANCELLED") and deadline.expired():
        return DeadlineExceeded(f"deadline of {deadline.timeout:g}s exceeded ({err.code}: {err.details})")
    return err


def outcome_unknown(err: LstmServeError) -> bool:
    """Whether a failed streaming call may have advanced the session past what the client
    was told (a broken connection, a deadline, a cancellation, a server fault)."""
    return err.code not in REFUSED_CODES


def status_code_name(err: BaseException) -> str:
    code = getattr(err, "code", None)
    try:
        value = code() if callable(code) else code
    except Exception:
        return "UNKNOWN"
    name = getattr(value, "name", None)
    return name if isinstance(name, str) else "UNKNOWN"
