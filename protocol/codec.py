"""One frame = one msgpack map with str keys. Decoding is bounded so hostile input costs little."""

from __future__ import annotations

from typing import Any

import msgpack

from stoker.protocol.errors import BadRequest
from stoker.protocol.messages import Message

# The default bound on one frame (the supervisor's `max_message_bytes`): a long prompt fits, and no
# frame costs unbounded memory. msgpack's own nesting limit (1024 levels) stops depth bombs.
MAX_FRAME_BYTES = 1024 * 1024
_MAX_CONTAINER_LEN = 100_000


def encode(msg: Message) -> bytes:
    """Pack one message into one frame."""
    return msgpack.packb(msg, use_bin_type=True)


def decode(frame: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Message:
    """Unpack one frame into a message; raise BadRequest (id None) if it is not a msgpack map."""
    if len(frame) > max_bytes:
        raise BadRequest(f"message of {len(frame)} bytes is over the {max_bytes}-byte limit (max_message_bytes)")
    try:
        obj: Any = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=False,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=min(_MAX_CONTAINER_LEN, max_bytes),
            max_map_len=min(_MAX_CONTAINER_LEN, max_bytes),
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise BadRequest(f"frame is not valid msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise BadRequest(f"frame must hold a msgpack map, not {type(obj).__name__}")
    if not all(isinstance(k, str) for k in obj):
        raise BadRequest("every key of the message map must be a string")
    return obj
