"""What a client gets back for a request, as typed values: shared by Client and AsyncClient."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import zmq

from stoker.protocol.client_core import ClientCore
from stoker.protocol.curve_keys import client_keys
from stoker.protocol.endpoint import endpoint_from_env, full_socket_path, ipc_path
from stoker.protocol.errors import Cancelled, StokerError, Unreachable, error_for_code
from stoker.protocol.messages import Event, Key, Message, Op, RequestId, is_terminal


@dataclass(frozen=True)
class Token:
    seq: int
    n: int
    text: str
    # With `logprobs=N`: an entry per token, {"token", "bytes", "logprob", "top_logprobs"}.
    logprobs: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Info:
    state: str
    position: int | None = None
    model: str | None = None  # the model the request runs on


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
    logprobs: list[dict[str, Any]] | None = None  # an entry per token, when asked for with `logprobs=N`


@dataclass(frozen=True)
class Embeddings:
    """A finished embed request: one vector per input, in order."""

    id: RequestId
    model: str
    embeddings: list[list[float]]
    usage: Mapping[str, int] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)


def embed_keys(input: str | Sequence[str], model: str | None, normalize: bool, truncate: bool,
               keys: Mapping[str, Any]) -> dict[str, Any]:
    return {Key.INPUT: input if isinstance(input, str) else list(input), Key.MODEL: model,
            Key.NORMALIZE: normalize, Key.TRUNCATE: truncate, **keys}


def embeddings_of(rid: RequestId, msg: Message) -> Embeddings | None:
    """An embed's reply: its Embeddings once it has its result, None before (an info). An error
    raises its exception, and so does a cancelled embed's end (Cancelled)."""
    ev = event_of(msg)
    if isinstance(ev, End):
        raise Cancelled(f"request {rid!r} was cancelled before it ended", rid)
    if isinstance(ev, dict):
        return Embeddings(rid, ev.get(Key.MODEL, ""), ev.get(Key.EMBEDDINGS, []), ev.get(Key.USAGE, {}),
                          ev.get(Key.TIMINGS, {}))
    return None


def generate_keys(prompt: str | None, messages: list[Mapping[str, str]] | None, model: str | None,
                  sampling: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a generate request (None values are left out when encoded)."""
    return {Key.MODEL: model, Key.PROMPT: prompt, Key.MESSAGES: messages, **sampling}


def event_of(msg: Message) -> Token | Info | End | dict[str, Any] | None:
    """A reply as a value: Token, Info, End, or a result's data. Errors raise their exception;
    events this version does not know are None (ignored, as the protocol asks)."""
    ev = msg.get(Key.EV)
    if ev == Event.TOKEN.value:
        return Token(msg[Key.SEQ], msg[Key.N], msg[Key.TEXT], msg.get(Key.LOGPROBS))
    if ev == Event.INFO.value:
        return Info(msg[Key.STATE], msg.get(Key.POSITION), msg.get(Key.MODEL))
    if ev == Event.END.value:
        return End(msg[Key.REASON], msg.get(Key.USAGE, {}), msg.get(Key.TIMINGS, {}))
    if ev == Event.RESULT.value:
        return dict(msg.get(Key.DATA, {}))
    if ev == Event.ERROR.value:
        raise error_for_code(msg[Key.CODE], msg[Key.MESSAGE], msg.get(Key.ID))
    return None


class StreamBase:
    """What Stream and AsyncStream share: one generate request in flight, its end once it has
    ended, and the rule that a stream left before its end cancels its request."""

    def __init__(self, client: Any, rid: RequestId) -> None:
        self.client = client
        self.id = rid
        self.end: End | None = None
        self.logprobs: list[dict[str, Any]] | None = None  # every token's entry so far, if asked for
        self._done = False

    def _take(self, msg: Message) -> list[Token | Info | End]:
        """One reply of this request: the event to give (none for one this version does not
        know). An error raises its exception, and ends the stream."""
        if is_terminal(msg):
            self._done = True
        try:
            ev = event_of(msg)
        except StokerError:
            self._done = True
            raise
        if isinstance(ev, End):
            self.end = ev
        elif isinstance(ev, Token) and ev.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(ev.logprobs)
        return [ev] if isinstance(ev, (Token, Info, End)) else []

    @contextmanager
    def _cancel_if_left(self) -> Iterator[None]:
        """Around reading the stream: leaving it before its end (a break, a closed generator,
        a cancelled task) cancels the request."""
        try:
            yield
        finally:
            if not self._done:
                self.cancel()

    def cancel(self) -> None:
        """Stop the request without waiting; its remaining replies are dropped."""
        if not self._done:
            self._done = True
            self.client._cancel_quietly(self.id)

    def __del__(self) -> None:
        if not self._done:
            try:
                self.cancel()
            except Exception:  # the client, its loop or the interpreter is going away
                pass

    def _completion(self, text: str) -> Completion:
        if self.end is None:
            raise Cancelled(f"request {self.id!r} was cancelled before it ended", self.id)
        return Completion(self.id, text, self.end.reason, self.end.usage, self.end.timings, self.logprobs)


def load_keys(model: str, pin: bool, keep_alive: float | None = None) -> dict[str, Any]:
    return {Key.MODEL: model, **({Key.PIN: True} if pin else {}),
            **({Key.KEEP_ALIVE: keep_alive} if keep_alive is not None else {})}


class ClientSocket:
    """What Client and AsyncClient share: one DEALER to the endpoint (with CurveZMQ keys when
    given), a monitor that reports the connection dropping, the protocol core, `closed`."""

    def __init__(self, ctx: zmq.Context, endpoint: str | None, timeout: float | None,
                 server_key: str | os.PathLike[str] | bytes | None = None,
                 client_key: str | os.PathLike[str] | None = None) -> None:
        self.endpoint = endpoint or endpoint_from_env(os.environ)
        self.timeout = timeout
        keys = client_keys(server_key, client_key, os.environ)  # before a socket exists to leak
        self.core = ClientCore()
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            keys.apply(self._sock)
        # Reports the connection dropping (the supervisor died, or restarted): a probe then
        # finds out at once what the supervisor still has, rather than after `timeout`.
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._sock.connect(self.endpoint)

    @property
    def closed(self) -> bool:
        return bool(self._sock.closed)

    def _close_sockets(self) -> None:
        if not self._sock.closed:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(linger=0)
            self._sock.close()

    def check_endpoint(self) -> None:
        """Raise Unreachable at once if the supervisor is plainly not there (an ipc endpoint with
        no socket file); a cheap look, for callers that would rather fail now than wait."""
        self._check_socket_file()

    def _check_socket_file(self) -> None:
        """An ipc endpoint with no socket file has no supervisor: say so at once. One whose file
        is set aside is full: a client already connected is still served, and a new one connects
        once some have left, so the ping goes ahead (see _no_pong)."""
        path = ipc_path(self.endpoint)
        if path is None:
            return
        try:
            path.stat()
        except FileNotFoundError:
            if full_socket_path(path).exists():
                return
            raise Unreachable(f"no supervisor at {self.endpoint} (no socket file)") from None
        except PermissionError:
            raise Unreachable(f"no permission to reach the supervisor at {self.endpoint}; a system service's "
                              "socket is for the members of its group (`stoker`)") from None
        if not os.access(path, os.R_OK | os.W_OK) and path.exists():  # (or set aside just now)
            raise Unreachable(f"no permission to use the socket {path}; a system service's socket is for the "
                              "members of its group (`stoker`)")

    def _no_pong(self, timeout: float) -> Unreachable:
        """Why a ping went unanswered: the supervisor is full (its socket file set aside), or gone."""
        path = ipc_path(self.endpoint)
        if path is not None and full_socket_path(path).exists():
            return Unreachable(f"the supervisor at {self.endpoint} has as many clients as it takes (max_clients) "
                               f"and did not take this one within {timeout:g} s; retry once some have left")
        return Unreachable(f"no supervisor answered at {self.endpoint} within {timeout:g} s")

    def _unreachable(self, limit: float | None, rid: RequestId = None) -> Unreachable:
        return Unreachable(f"the supervisor at {self.endpoint} did not answer for {limit:g} s", rid)


__all__ = ["ClientSocket", "Completion", "Embeddings", "End", "Info", "Op", "Token", "embed_keys", "embeddings_of",
           "event_of", "generate_keys", "load_keys"]
