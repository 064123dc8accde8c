"""Server configuration: every option is a flag and an environment variable (LSTM_SERVE_<NAME>).

Precedence: command-line flag > environment variable > default.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

from model.checkpoint import DEFAULT_CHECKPOINT
from service.engine import Durability, EngineLimits

ENV_PREFIX = "LSTM_SERVE_"


@dataclass
class ServerConfig:
    checkpoint: str = field(default=str(DEFAULT_CHECKPOINT), metadata={"help": "checkpoint directory to serve"})
    host: str = field(default="127.0.0.1", metadata={"help": "gRPC bind address (0.0.0.0 for all interfaces)"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 = any free port)"})
    port_file: str = field(default="", metadata={"help": "write the bound gRPC port here once serving"})
    metrics_host: str = field(default="", metadata={"help": "Prometheus /metrics bind address (default: --host)"})
    metrics_port: int = field(default=9400, metadata={"help": "Prometheus /metrics port (0 = any, -1 = off)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N (auto: cuda when available)"})
    dtype: str = field(default="float32", metadata={"help": "model compute dtype: float32, bfloat16 or float16"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads of the model's thread (0 = torch's default)"})
    log_format: str = field(default="human", metadata={"help": "human or json (one object per line)"})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error"})
    grace_seconds: float = field(default=10.0, metadata={
        "help": "on SIGTERM/SIGINT, finish in-flight work for at most this long (a second signal stops at once), "
                "then store the sessions"})
    state_dir: str = field(default="state", metadata={"help": "directory of the session state store (SQLite)"})
    durability: str = field(
        default="snapshot",
        metadata={"help": "none (memory only), snapshot (periodic) or journal (every token, fsynced)"},
    )
    snapshot_interval_seconds: float = field(
        default=5.0, metadata={"help": "how often dirty sessions are snapshotted to the store"}
    )
    restore: str = field(
        default="lazy", metadata={"help": "restore stored sessions lazily (on first use) or eagerly (at start)"}
    )
    max_resident_sessions: int = field(
        default=0, metadata={"help": "sessions kept on the device; the least recently used beyond are evicted to the "
                                  "state store (0 = max-sessions; needs --durability snapshot or journal)"}
    )
    auth_tokens: str = field(
        default="", metadata={"help": "file of bearer tokens, one 'TOKEN PRINCIPAL' per line (empty = no auth)"}
    )
    auth_tokens_inline: str = field(
        default="", metadata={"help": "bearer tokens as 'PRINCIPAL:TOKEN,...' (prefer the env variable)"}
    )
    tls_cert: str = field(default="", metadata={"help": "PEM server certificate chain (enables TLS)"})
    tls_key: str = field(default="", metadata={"help": "PEM private key of --tls-cert"})
    tls_client_ca: str = field(default="", metadata={"help": "PEM CA bundle; clients must present a cert (mTLS)"})
    max_message_bytes: int = field(default=4 * 1024 * 1024, metadata={"help": "largest request message"})
    max_concurrent_rpcs: int = field(default=4096, metadata={"help": "RPCs in flight before RESOURCE_EXHAUSTED"})
    max_sessions: int = field(default=EngineLimits.max_sessions, metadata={"help": "sessions that may exist"})
    max_tokens_per_request: int = field(
        default=EngineLimits.max_tokens_per_request, metadata={"help": "input tokens in one request"}
    )
    max_generate_tokens: int = field(
        default=EngineLimits.max_generate_tokens, metadata={"help": "max_tokens of one Generate"}
    )
    default_ttl_seconds: int = field(
        default=EngineLimits.default_ttl_seconds, metadata={"help": "idle session time-to-live"}
    )
    max_ttl_seconds: int = field(
        default=EngineLimits.max_ttl_seconds, metadata={"help": "largest ttl a session may ask for"}
    )
    max_batch_sessions: int = field(
        default=EngineLimits.max_batch_sessions, metadata={"help": "sessions in one engine step"}
    )
    max_batch_tokens: int = field(default=EngineLimits.max_batch_tokens, metadata={"help": "tokens in one engine step"})
    max_chunk_tokens: int = field(
        default=EngineLimits.max_chunk_tokens, metadata={"help": "tokens of one session per step (longer split)"}
    )
    max_queued_tokens: int = field(
        default=EngineLimits.max_queued_tokens, metadata={"help": "tokens waiting in the engine, all sessions"}
    )

    max_batch_wait_ms: float = field(
        default=EngineLimits.max_batch_wait_ms,
        metadata={"help": "hold a step up to this long for sessions just answered to send again (0 = never)"},
    )

    def engine_limits(self) -> EngineLimits:
        return EngineLimits(
            max_sessions=self.max_sessions,
            max_tokens_per_request=self.max_tokens_per_request,
            max_generate_tokens=self.max_generate_tokens,
            default_ttl_seconds=self.default_ttl_seconds,
            max_ttl_seconds=self.max_ttl_seconds,
            max_batch_sessions=self.max_batch_sessions,
            max_batch_tokens=self.max_batch_tokens,
            max_chunk_tokens=self.max_chunk_tokens,
            max_queued_tokens=self.max_queued_tokens,
            max_batch_wait_ms=self.max_batch_wait_ms,
            max_resident_sessions=self.max_resident_sessions,
        )

    def durability_config(self) -> Durability:
        return Durability(self.durability, self.snapshot_interval_seconds, self.restore)


DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")  # cuda:N picks one GPU of several
CHOICES = {
    "dtype": ["float32", "bfloat16", "float16"],
    "log_format": ["human", "json"],
    "log_level": ["debug", "info", "warning", "error"],
    "durability": ["none", "snapshot", "journal"],
    "restore": ["lazy", "eager"],
}


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def build_parser(environ: dict[str, str] | None = None) -> argparse.ArgumentParser:
    environ = dict(os.environ) if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="lstm-serve",
        description="Serve a recurrent language model over gRPC with per-session state and continuous batching.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields(ServerConfig):
        kind: Any = {"int": int, "float": float}.get(str(f.type), str)
        default = f.default
        env = env_name(f.name)
        if env in environ:
            try:
                default = kind(environ[env])
            except ValueError:
                parser.error(f"environment variable {env}={environ[env]!r} is not a valid {kind.__name__}")
            if f.name in CHOICES or f.name == "device":
                default = default.strip().lower()  # (LOG_LEVEL=INFO as logging spells it)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=kind,
            default=default,
            choices=CHOICES.get(f.name),
            help=f"{f.metadata['help']} [env {env}]",
        )
    return parser


def parse_config(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> ServerConfig:
    parser = build_parser(environ)
    ns = parser.parse_args(argv)
    config = ServerConfig(**vars(ns))
    environ = dict(os.environ) if environ is None else environ
    # argparse checks choices for flags, not for defaults, so a value outside them came from the
    # environment (and no flag overrode it): a typo such as durability=jounral must not start
    # quietly in another mode.
    for name, allowed in CHOICES.items():
        if getattr(config, name) not in allowed:
            parser.error(f"environment variable {env_name(name)}={environ.get(env_name(name))!r} must be one of "
                         f"{', '.join(allowed)}")
    if not DEVICE_RE.match(config.device):
        parser.error(f"--device / {env_name('device')} must be auto, cpu, cuda or cuda:N, got {config.device!r}")
    for name in ("max_sessions", "max_tokens_per_request", "max_generate_tokens", "default_ttl_seconds",
                 "max_ttl_seconds", "max_batch_sessions", "max_batch_tokens", "max_chunk_tokens",
                 "max_queued_tokens", "max_message_bytes", "max_concurrent_rpcs"):
        if getattr(config, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= config.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {config.port}")
    if not -1 <= config.metrics_port <= 65535:
        parser.error(f"--metrics-port must be between -1 (off) and 65535, got {config.metrics_port}")
    if config.threads < 0:
        parser.error(f"--threads must be >= 0 (0 = torch's default), got {config.threads}")
    if not config.grace_seconds >= 0:  # (NaN too)
        parser.error(f"--grace-seconds must be >= 0, got {config.grace_seconds}")
    if config.max_resident_sessions < 0 or config.snapshot_interval_seconds <= 0 or config.max_batch_wait_ms < 0:
        parser.error(
            "--max-resident-sessions and --max-batch-wait-ms must be >= 0 and --snapshot-interval-seconds > 0"
        )
    # Every request the limits allow must be admissible: the engine queue holds a whole Generate
    # (prompt + max_tokens), and a message can carry the largest text (4 bytes per character).
    largest = config.max_tokens_per_request + config.max_generate_tokens
    if config.max_queued_tokens < largest:
        parser.error(f"--max-queued-tokens {config.max_queued_tokens} is less than the largest request the other "
                     f"limits allow ({largest}: --max-tokens-per-request + --max-generate-tokens), which could "
                     "never run; raise it or lower those")
    needed = 4 * config.max_tokens_per_request + 1024
    if config.max_message_bytes < needed:
        parser.error(f"--max-message-bytes {config.max_message_bytes} cannot carry a request of "
                     f"--max-tokens-per-request {config.max_tokens_per_request} characters (up to {needed} bytes)")
    if config.max_resident_sessions and config.durability == "none":
        # An evicted session goes to the state store; with no store the bound could only be ignored.
        parser.error(
            "--max-resident-sessions needs a state store to evict to: use --durability snapshot or journal "
            "(with --durability none, bound the sessions with --max-sessions)"
        )
    if bool(config.tls_cert) != bool(config.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if config.tls_client_ca and not config.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    if config.default_ttl_seconds > config.max_ttl_seconds:
        parser.error("--default-ttl-seconds must not exceed --max-ttl-seconds")
    return config
