"""A worker's generation stream (internal, like wire.py): TOKEN, END and ERROR frames over a
pipe to the supervisor.

Why a pipe and not the worker's DEALER socket: on a machine whose cores all run the model, every
token costs the model whatever the relay runs between two of its steps. A ZeroMQ send from the
worker wakes the worker's I/O thread, which then wakes the supervisor's: two thread wake-ups and
libzmq's cold send path per token, on the model's own core. A pipe write wakes the supervisor's
loop directly. Everything else (hello, ready, load failures, heartbeats, and the supervisor's
requests) stays on the sockets; the stream carries only what follows a GENERATE, in order.

A frame is a 4-byte little-endian length, then one msgpack map (see codec.encode).
"""

from __future__ import annotations

import os
import struct

from stoker.protocol.codec import encode
from stoker.protocol.messages import Message

_HEADER = struct.Struct("<I")
_READ_BYTES = 256 * 1024


def frame(msg: Message) -> bytes:
    """One message as a stream frame."""
    body = encode(msg)
    return _HEADER.pack(len(body)) + body


def write_all(fd: int, data: bytes) -> None:
    """Write every byte (a pipe takes at most its buffer at once). Raises BrokenPipeError when the
    reader is gone."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class StreamReader:
    """Reads frames from the non-blocking read end of a worker's stream pipe."""

    def __init__(self, fd: int, max_frame_bytes: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.max_frame_bytes = max_frame_bytes
        self.eof = False
        self.error: str | None = None  # set once the stream held something that is not a frame
        self._buf = bytearray()

    def read(self) -> list[bytes]:
        """The frames complete so far (their msgpack bodies), reading until the pipe is empty.
        Sets `eof` once the writer has closed its end (the worker exited), and `error` when what
        follows the frames returned is not a frame (nothing more is read then)."""
        while not self.eof and self.error is None:
            try:
                data = os.read(self.fd, _READ_BYTES)
            except BlockingIOError:
                break
            if not data:
                self.eof = True
            self._buf += data
            if len(data) < _READ_BYTES:  # the pipe held less than asked: it is empty now
                break
        return self._frames()

    def _frames(self) -> list[bytes]:
        frames: list[bytes] = []
        buf, pos, end = self._buf, 0, len(self._buf)
        while end - pos >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf, pos)
            if size > self.max_frame_bytes:
                self.error = f"a stream frame of {size} bytes is over the {self.max_frame_bytes}-byte limit"
                buf.clear()
                return frames
            if end - pos - _HEADER.size < size:
                break
            start = pos + _HEADER.size
            frames.append(bytes(buf[start:start + size]))
            pos = start + size
        if pos:
            del buf[:pos]
        return frames

    @property
    def partial(self) -> int:
        """Bytes of a frame begun but not finished."""
        return len(self._buf)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
