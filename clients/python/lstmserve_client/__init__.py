"""Python client of lstm-serve: stateful, streaming inference with a recurrent language model.

    from lstmserve_client import Client

    with Client("127.0.0.1:50051") as client:
        with client.session() as s:
            s.step("ROMEO:")
            print(s.generate_text("\\n", max_tokens=200, temperature=0.8))

See docs/client.md for the whole API.
"""

from ._version import __version__
from .aio import AsyncClient, AsyncSession, StepMultiplexer
from .client import Client, Session
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
from .errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    LstmServeError,
    PermissionDenied,
    PositionConflict,
    ResourceExhausted,
    ServerError,
    SessionNotFound,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "AsyncSession",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GeneratedToken",
    "InvalidInput",
    "LstmServeError",
    "ModelInfo",
    "PermissionDenied",
    "PositionConflict",
    "ResourceExhausted",
    "RetryPolicy",
    "ServerError",
    "ServerLimits",
    "Session",
    "SessionInfo",
    "SessionNotFound",
    "StepMultiplexer",
    "StepResult",
    "TlsConfig",
    "TokenOutput",
    "Unauthenticated",
    "Unavailable",
    "__version__",
]
