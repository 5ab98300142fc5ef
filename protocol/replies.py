"""What a client gets back for a request, as typed values: shared by Client and AsyncClient."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import zmq

from stoker.protocol import messages as m
from stoker.protocol.codec import decode, encode
from stoker.protocol.endpoint import endpoint_from_env, ipc_path
from stoker.protocol.errors import BadRequest, Internal, Unreachable, error_for_code
from stoker.protocol.messages import Event, Key, Message, Op, RequestId

# Replies can be larger than requests (tokens merged for a slow reader, a long status); a client
# must not choke on a legitimate one.
MAX_REPLY_BYTES = 64 * 1024 * 1024
# How long a liveness ping may take when a request has been silent for the client's timeout.
PROBE_S = 5.0


@dataclass(frozen=True)
class Token:
    seq: int
    n: int
    text: str


@dataclass(frozen=True)
class Info:
    state: str
    position: int | None = None


@dataclass(frozen=True)
class End:
    reason: str
    usage: Mapping[str, int]
    timings: Mapping[str, float]


@dataclass(frozen=True)
class Completion:
    """A finished generate request: the whole text, why it ended, and what it took."""

    id: RequestId
    text: str
    reason: str
    usage: Mapping[str, int] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)


def generate_keys(prompt: str | None, messages: list[Mapping[str, str]] | None, model: str | None,
                  sampling: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a generate request (None values are left out when encoded)."""
    return {Key.MODEL: model, Key.PROMPT: prompt, Key.MESSAGES: messages, **sampling}


def event_of(msg: Message) -> Token | Info | End | dict[str, Any] | None:
    """A reply as a value: Token, Info, End, or a result's data. Errors raise their exception;
    events this version does not know are None (ignored, as the protocol asks)."""
    ev = msg.get(Key.EV)
    if ev == Event.TOKEN.value:
        return Token(msg[Key.SEQ], msg[Key.N], msg[Key.TEXT])
    if ev == Event.INFO.value:
        return Info(msg[Key.STATE], msg.get(Key.POSITION))
    if ev == Event.END.value:
        return End(msg[Key.REASON], msg.get(Key.USAGE, {}), msg.get(Key.TIMINGS, {}))
    if ev == Event.RESULT.value:
        return dict(msg.get(Key.DATA, {}))
    if ev == Event.ERROR.value:
        raise error_for_code(msg[Key.CODE], msg[Key.MESSAGE], msg.get(Key.ID))
    return None


def load_keys(model: str, pin: bool) -> dict[str, Any]:
    return {Key.MODEL: model, **({Key.PIN: True} if pin else {})}


class ClientSocket:
    """What Client and AsyncClient share: one DEALER to the endpoint, request ids, `closed`."""

    def __init__(self, ctx: zmq.Context, endpoint: str | None, timeout: float | None) -> None:
        self.endpoint = endpoint or endpoint_from_env(os.environ)
        self.timeout = timeout
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.endpoint)
        self._ids = itertools.count(1)

    @property
    def closed(self) -> bool:
        return bool(self._sock.closed)

    @staticmethod
    def _frame(op: Op, rid: RequestId, keys: Mapping[str, Any]) -> bytes:
        """A request, encoded; what cannot be encoded (a lone surrogate, an odd type) is BadRequest."""
        try:
            return encode(m.request(op, rid, **keys))
        except (UnicodeError, TypeError, ValueError, OverflowError) as exc:
            raise BadRequest(f"the request cannot be encoded: {exc}", rid) from None

    @staticmethod
    def _decode(frame: bytes) -> Message:
        try:
            msg = decode(frame, MAX_REPLY_BYTES)
        except Exception as exc:
            raise Internal(f"the supervisor sent a reply this client cannot read: {exc}") from None
        if not isinstance(msg, dict):
            raise Internal("the supervisor sent a reply that is not a map")
        return msg

    def _check_socket_file(self) -> None:
        """An ipc endpoint with no socket file has no supervisor: say so at once."""
        path = ipc_path(self.endpoint)
        if path is None:
            return
        try:
            path.stat()
        except FileNotFoundError:
            raise Unreachable(f"no supervisor at {self.endpoint} (no socket file)") from None
        except PermissionError:
            raise Unreachable(f"no permission to reach the supervisor at {self.endpoint}; a system service's "
                              "socket is for the members of its group (`stoker`)") from None
        if not os.access(path, os.R_OK | os.W_OK):
            raise Unreachable(f"no permission to use the socket {path}; a system service's socket is for the "
                              "members of its group (`stoker`)")


__all__ = ["ClientSocket", "Completion", "End", "Info", "Op", "Token", "event_of", "generate_keys", "load_keys"]
