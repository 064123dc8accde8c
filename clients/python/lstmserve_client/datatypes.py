"""Plain data classes of the client API (no protobuf types leak to users)."""

from __future__ import annotations

import datetime as _dt
import math
import random
from collections.abc import Collection
from dataclasses import dataclass

__all__ = [
    "GeneratedToken",
    "ModelInfo",
    "RetryPolicy",
    "ServerLimits",
    "SessionInfo",
    "StepResult",
    "TlsConfig",
    "TokenOutput",
]


@dataclass(frozen=True)
class ServerLimits:
    """Limits the server enforces (``GetModelInfo``); 0 means the server did not say."""

    max_sessions: int = 0
    max_tokens_per_request: int = 0
    max_generate_tokens: int = 0
    max_message_bytes: int = 0
    default_ttl_seconds: int = 0
    max_ttl_seconds: int = 0
    max_batch_sessions: int = 0
    max_batch_tokens: int = 0
    max_queued_tokens: int = 0


@dataclass(frozen=True)
class ModelInfo:
    """The served model."""

    vocab: list[str]  # vocab[i] is the text of token id i
    cell_type: str  # "lstm" or "gru" ("unspecified" if the server did not say)
    num_layers: int
    hidden_size: int
    embedding_size: int
    checkpoint_sha256: str
    val_loss: float  # nats per token
    device: str  # "cpu" or "cuda"
    dtype: str  # "float32", "bfloat16", ...
    limits: ServerLimits
    server_version: str

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


@dataclass(frozen=True)
class SessionInfo:
    """A session as the server describes it (``GetSession``)."""

    session_id: str
    position: int
    create_time: _dt.datetime | None  # timezone-aware UTC, None if unset
    expire_time: _dt.datetime | None
    ttl_seconds: int


@dataclass(frozen=True)
class TokenOutput:
    """The model's output after one input token: its view of the NEXT token."""

    token: int  # the input token this output follows
    text: str  # its text
    top_tokens: list[int]  # the most likely next tokens, most likely first
    top_texts: list[str]  # their texts
    top_logprobs: list[float]  # their natural-log probabilities
    logprobs: list[float] | None = None  # log-softmax over the whole vocabulary, if asked for
    hidden: list[float] | None = None  # the top layer's h after this token, if asked for


@dataclass(frozen=True)
class StepResult:
    """The response to one step: one output per input token, in order."""

    session_id: str
    position: int  # the session's position after this step
    outputs: list[TokenOutput]

    @property
    def text(self) -> str:
        """The input text these outputs follow."""
        return "".join(o.text for o in self.outputs)


@dataclass(frozen=True)
class GeneratedToken:
    """One sampled token of a ``generate`` stream."""

    token: int
    text: str
    logprob: float  # under the model, before temperature/top-k/top-p
    position: int  # the session's position after this token
    finish_reason: str | None = None  # "length" or "stop" on the last token only


@dataclass(frozen=True)
class TlsConfig:
    """TLS settings of a channel (all PEM bytes; None picks gRPC's defaults).

    ``root_certificates``: CAs that sign the server's certificate (None: system roots).
    ``certificate_chain`` and ``private_key``: the client's certificate for mutual TLS.
    ``server_name_override``: the name to verify the server's certificate against when it
    differs from the target's host (testing only).
    """

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name_override: str | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of calls that are safe to repeat, with exponential backoff and jitter.

    Attempt n (n >= 1 is the first retry) waits
    ``min(max_backoff, initial_backoff * multiplier ** (n - 1))``, reduced by a random
    fraction of up to ``jitter``. All attempts of one call share its timeout. A
    ``RESOURCE_EXHAUSTED`` with a ``retry-after-ms`` hint (when that code is listed in
    ``codes``) waits at least the hint.
    """

    max_attempts: int = 4  # 1 disables retries
    initial_backoff: float = 0.1  # seconds
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5  # 0..1
    codes: Collection[str] = frozenset({"UNAVAILABLE"})  # status code names to retry on

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not (self.initial_backoff >= 0 and self.max_backoff >= 0 and self.multiplier >= 1):
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be in [0, 1]")
        if isinstance(self.codes, str):
            raise ValueError("codes must be a collection of status code names, not a string")
        object.__setattr__(self, "codes", frozenset(c.upper() for c in self.codes))

    @classmethod
    def disabled(cls) -> RetryPolicy:
        """A policy that never retries."""
        return cls(max_attempts=1)

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        if retry < 1:
            return 0.0
        exp = min(float(retry - 1), 64.0)
        base = min(self.max_backoff, self.initial_backoff * math.pow(self.multiplier, exp))
        r = (rng or random).random()
        return base * (1.0 - self.jitter * r)
