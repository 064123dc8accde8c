"""The client's exceptions: one hierarchy, rooted at :class:`LstmServeError`.

Every gRPC failure reaching user code is one of these, built from the server's status
code, message and trailing metadata by :func:`from_rpc_error`; a raw ``grpc.RpcError``
never escapes the client (iterators included).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "AlreadyExists",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidInput",
    "LstmServeError",
    "PermissionDenied",
    "PositionConflict",
    "ResourceExhausted",
    "ServerError",
    "SessionNotFound",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]

# Trailing metadata keys the server sets on some errors.
POSITION_METADATA_KEY = "lstm-position"
RETRY_AFTER_METADATA_KEY = "retry-after-ms"


class LstmServeError(Exception):
    """Base class of every error raised by the client.

    Attributes:
        code: name of the gRPC status code, e.g. ``"NOT_FOUND"``.
        details: the server's (or the client's) message.
        metadata: trailing metadata of the failed call, as a dict of str to str
            (binary values are left out).
    """

    default_code = "UNKNOWN"

    def __init__(self, details: str, *, code: str | None = None, metadata: dict[str, str] | None = None) -> None:
        self.code: str = code or self.default_code
        self.details: str = details
        self.metadata: dict[str, str] = dict(metadata or {})
        super().__init__(f"{self.code}: {details}")


class SessionNotFound(LstmServeError):
    """NOT_FOUND: the session does not exist (never created, deleted, or expired)."""

    default_code = "NOT_FOUND"


class InvalidInput(LstmServeError, ValueError):
    """INVALID_ARGUMENT: a bad request (a character outside the vocabulary, a token id out
    of range, empty input, a bad sampling parameter...). Also raised by the client itself,
    before any call, for arguments it can check locally."""

    default_code = "INVALID_ARGUMENT"


class ResourceExhausted(LstmServeError):
    """RESOURCE_EXHAUSTED: a server limit was hit (sessions, queued tokens, message size).

    ``retry_after`` is the server's hint in seconds (trailing metadata ``retry-after-ms``),
    or None when it gave none."""

    default_code = "RESOURCE_EXHAUSTED"

    def __init__(self, details: str, *, code: str | None = None, metadata: dict[str, str] | None = None) -> None:
        super().__init__(details, code=code, metadata=metadata)
        self.retry_after: float | None = None
        raw = self.metadata.get(RETRY_AFTER_METADATA_KEY)
        if raw is not None:
            try:
                self.retry_after = max(0.0, float(raw) / 1000.0)
            except ValueError:
                self.retry_after = None


class PositionConflict(LstmServeError):
    """ABORTED: the session's position differs from the one the client expected (another
    client used the session, or this client's view is stale). Nothing was applied.

    ``current_position`` is the session's position on the server (trailing metadata
    ``lstm-position``), or None when the server did not send it."""

    default_code = "ABORTED"

    def __init__(self, details: str, *, code: str | None = None, metadata: dict[str, str] | None = None) -> None:
        super().__init__(details, code=code, metadata=metadata)
        self.current_position: int | None = None
        raw = self.metadata.get(POSITION_METADATA_KEY)
        if raw is not None:
            try:
                self.current_position = int(raw)
            except ValueError:
                self.current_position = None


class Unavailable(LstmServeError):
    """UNAVAILABLE: the server cannot be reached or is shutting down (after retries)."""

    default_code = "UNAVAILABLE"


class Unauthenticated(LstmServeError):
    """UNAUTHENTICATED: a missing or wrong bearer token."""

    default_code = "UNAUTHENTICATED"


class PermissionDenied(LstmServeError):
    """PERMISSION_DENIED: the caller may not do this."""

    default_code = "PERMISSION_DENIED"


class AlreadyExists(LstmServeError):
    """ALREADY_EXISTS: a session with the proposed id exists already."""

    default_code = "ALREADY_EXISTS"


class FailedPrecondition(LstmServeError):
    """FAILED_PRECONDITION: the request cannot run in the current state (for example a
    session bound to other weights than the ones served now)."""

    default_code = "FAILED_PRECONDITION"


class DeadlineExceeded(LstmServeError):
    """DEADLINE_EXCEEDED: the call's timeout passed before it finished."""

    default_code = "DEADLINE_EXCEEDED"


class Cancelled(LstmServeError):
    """CANCELLED: the call was cancelled (by the client or the server)."""

    default_code = "CANCELLED"


class ServerError(LstmServeError):
    """Any other status (INTERNAL, UNKNOWN, UNIMPLEMENTED, DATA_LOSS, ...)."""

    default_code = "INTERNAL"


_BY_CODE: dict[str, type[LstmServeError]] = {
    "NOT_FOUND": SessionNotFound,
    "INVALID_ARGUMENT": InvalidInput,
    "RESOURCE_EXHAUSTED": ResourceExhausted,
    "ABORTED": PositionConflict,
    "UNAVAILABLE": Unavailable,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
    "ALREADY_EXISTS": AlreadyExists,
    "FAILED_PRECONDITION": FailedPrecondition,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "CANCELLED": Cancelled,
}


def error_class(code: str) -> type[LstmServeError]:
    """The exception class for a gRPC status code name."""
    return _BY_CODE.get(code, ServerError)


def _code_name(code: Any) -> str:
    if code is None:
        return "UNKNOWN"
    name = getattr(code, "name", None)
    if isinstance(name, str):
        return name
    return str(code).rsplit(".", 1)[-1]


def _metadata_dict(md: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    if md is None:
        return out
    items: Iterable[Any] = md.items() if isinstance(md, dict) else md
    for item in items:
        try:
            key, value = item[0], item[1]
        except (TypeError, IndexError, KeyError):
            key = getattr(item, "key", None)
            value = getattr(item, "value", None)
        if not isinstance(key, str) or not isinstance(value, str):
            continue  # binary (-bin) values are of no use here
        out.setdefault(key.lower(), value)
    return out


def _call(obj: Any, name: str) -> Any:
    attr = getattr(obj, name, None)
    if attr is None:
        return None
    try:
        return attr() if callable(attr) else attr
    except Exception:
        return None


def from_rpc_error(err: BaseException) -> LstmServeError:
    """Translate a ``grpc.RpcError`` (sync or ``grpc.aio``) into the client's exception.

    Works with any object that has the ``code()``, ``details()`` and
    ``trailing_metadata()`` methods of ``grpc.Call``; an object without them becomes a
    :class:`ServerError` carrying its ``str()``.
    """
    if isinstance(err, LstmServeError):
        return err
    code = _code_name(_call(err, "code"))
    details = _call(err, "details")
    if not isinstance(details, str) or not details:
        details = str(err) or code
    metadata = _metadata_dict(_call(err, "trailing_metadata"))
    cls = error_class(code)
    return cls(details, code=code, metadata=metadata)
