"""Logging of lstm-serve: stdlib `logging`, human-readable or one JSON object per line.

    configure_logging("json", "info")
    log = logging.getLogger("lstm_serve.server")
    log.info("session created", extra={"session_id": short_id(sid), "request_id": rid})

emits

    {"ts": "2025-01-01T12:00:00.123Z", "level": "INFO", "logger": "lstm_serve.server",
     "msg": "session created", "session_id": "Zm9vYmFy…", "request_id": "..."}

A session id is a bearer credential: whoever knows it can read and drive the session.
Log only `short_id(session_id)`. As a safety net, both formatters shorten an `extra`
field named `session_id` on every record above DEBUG.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

FORMATS = ("human", "json")
SHORT_ID_CHARS = 8

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
# Marks the handler configure_logging installed, so calling it again replaces it.
_HANDLER_NAME = "lstm-serve"


def short_id(session_id: str) -> str:
    """A loggable prefix of a session id: its first 8 characters and an ellipsis."""
    if len(session_id) <= SHORT_ID_CHARS:
        return session_id
    return session_id[:SHORT_ID_CHARS] + "…"


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")}
    sid = fields.get("session_id")
    if isinstance(sid, str) and record.levelno > logging.DEBUG:
        fields["session_id"] = short_id(sid)
    return fields


def _iso_utc(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, the `extra` fields, exc if any."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extra_fields(record).items():
            obj.setdefault(key, value)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        return json.dumps(obj, ensure_ascii=False, default=str)


class HumanFormatter(logging.Formatter):
    """`2025-01-01T12:00:00.123Z INFO  logger: msg key=value ...`"""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_iso_utc(record.created)} {record.levelname:<5} {record.name}: {record.getMessage()}"
        extras = _extra_fields(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def configure_logging(fmt: str = "human", level: str = "info", stream: TextIO | None = None) -> None:
    """Send all logs to `stream` (stderr by default) in `fmt` ("human" or "json") at `level`.

    Idempotent: a second call replaces the handler the first one installed.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)
