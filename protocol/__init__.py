"""stoker wire protocol v1: message names, codec, validation, errors and a client.

Everything that crosses a socket is defined here once; the supervisor, the workers, the CLI
and the tests import these names instead of spelling keys and codes themselves.
"""

from stoker.protocol.codec import MAX_FRAME_BYTES, decode, encode
from stoker.protocol.errors import (
    BadRequest,
    InsufficientMemory,
    Internal,
    LoadFailed,
    Overloaded,
    ProtocolError,
    ShuttingDown,
    StokerError,
    Timeout,
    Unreachable,
    UnknownModel,
    UnsupportedVersion,
    WorkerCrashed,
    error_for_code,
)
from stoker.protocol.messages import (
    PROTOCOL_VERSION,
    ErrorCode,
    Event,
    InfoState,
    Op,
    Reason,
)

__all__ = [
    "MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "BadRequest",
    "ErrorCode",
    "Event",
    "InfoState",
    "InsufficientMemory",
    "Internal",
    "LoadFailed",
    "Op",
    "Overloaded",
    "ProtocolError",
    "Reason",
    "ShuttingDown",
    "StokerError",
    "Timeout",
    "UnknownModel",
    "Unreachable",
    "UnsupportedVersion",
    "WorkerCrashed",
    "decode",
    "encode",
    "error_for_code",
]
