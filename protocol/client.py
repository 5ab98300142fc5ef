"""A small synchronous client for protocol v1 (what the CLI uses; any program may).

    with Client() as c:
        for ev in c.stream("Why is the sky blue?", max_tokens=64):
            if isinstance(ev, Token):
                print(ev.text, end="", flush=True)

Errors raise the StokerError subclass of their wire code; silence longer than `timeout` raises
Timeout; a supervisor that never answers a ping raises Unreachable.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import zmq

from stoker.protocol import messages as m
from stoker.protocol.codec import decode, encode
from stoker.protocol.endpoint import endpoint_from_env, ipc_path
from stoker.protocol.errors import Timeout, Unreachable, error_for_code
from stoker.protocol.messages import Event, Key, Message, Op


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


class Client:
    """One DEALER socket to the supervisor. Not thread-safe: use one Client per thread."""

    def __init__(self, endpoint: str | None = None, *, timeout: float | None = 600.0) -> None:
        self.endpoint = endpoint or endpoint_from_env(os.environ)
        self.timeout = timeout
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.endpoint)
        self._ids = itertools.count(1)
        self._inbox: dict[Any, deque[Message]] = {}
        self._abandoned: set[Any] = set()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    # ---- plumbing ------------------------------------------------------------------------------

    def send(self, op: Op, **keys: Any) -> int:
        """Send a request; returns its id."""
        rid = next(self._ids)
        self._sock.send(encode(m.request(op, rid, **keys)))
        return rid

    def recv(self, rid: Any, timeout: float | None = None) -> Message:
        """The next reply for request `rid`, keeping other requests' replies for later."""
        waiting = self._inbox.get(rid)
        if waiting:
            msg = waiting.popleft()
            if not waiting:
                del self._inbox[rid]
            return msg
        limit = self.timeout if timeout is None else timeout
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._sock.poll(None if wait is None else int(wait * 1000) + 1):
                raise Timeout(f"no reply from the supervisor at {self.endpoint} for {limit:.0f} s", rid)
            msg = decode(self._sock.recv())
            got = msg.get(Key.ID)
            if got == rid:
                return msg
            if got is None:
                continue  # about a frame this client never sends malformed; nothing to route it to
            if got in self._abandoned:
                if m.is_terminal(msg):
                    self._abandoned.discard(got)
                continue
            self._inbox.setdefault(got, deque()).append(msg)

    def call(self, op: Op, timeout: float | None = None, **keys: Any) -> dict[str, Any]:
        """A request answered by one `result`; returns its data."""
        rid = self.send(op, **keys)
        try:
            msg = self.recv(rid, timeout)
        except Timeout:
            self._abandoned.add(rid)  # its reply may still come: drop it then
            raise
        if msg[Key.EV] == Event.ERROR.value:
            raise error_for_code(msg[Key.CODE], msg[Key.MESSAGE], rid)
        return msg.get(Key.DATA, {})

    # ---- ops -----------------------------------------------------------------------------------

    def ping(self, timeout: float = 2.0) -> dict[str, Any]:
        """Raise Unreachable unless a supervisor answers within `timeout` seconds."""
        path = ipc_path(self.endpoint)
        if path is not None and not path.exists():
            raise Unreachable(f"no supervisor at {self.endpoint} (no socket file)")
        try:
            return self.call(Op.PING, timeout=timeout)
        except Timeout:
            raise Unreachable(f"no supervisor answered at {self.endpoint} within {timeout:g} s") from None

    def status(self) -> dict[str, Any]:
        return self.call(Op.STATUS)

    def models(self) -> dict[str, Any]:
        return self.call(Op.MODELS)

    def load(self, model: str, pin: bool = False) -> dict[str, Any]:
        """Load a model (and with `pin`, keep it loaded until `unload`)."""
        return self.call(Op.LOAD, model=model, **({"pin": True} if pin else {}))

    def unload(self, model: str) -> dict[str, Any]:
        return self.call(Op.UNLOAD, model=model)

    def shutdown(self) -> dict[str, Any]:
        return self.call(Op.SHUTDOWN)

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        model: str | None = None,
        **sampling: Any,
    ) -> Iterator[Token | Info | End]:
        """Generate; yields Info and Token events, then one End. Leaving early cancels the request."""
        rid = self.send(Op.GENERATE, model=model, prompt=prompt, messages=messages, **sampling)
        finished = False
        try:
            while True:
                msg = self.recv(rid)
                ev = msg.get(Key.EV)
                if ev == Event.TOKEN.value:
                    yield Token(msg[Key.SEQ], msg[Key.N], msg[Key.TEXT])
                elif ev == Event.INFO.value:
                    yield Info(msg[Key.STATE], msg.get(Key.POSITION))
                elif ev == Event.END.value:
                    finished = True
                    yield End(msg[Key.REASON], msg.get(Key.USAGE, {}), msg.get(Key.TIMINGS, {}))
                    return
                elif ev == Event.ERROR.value:
                    finished = True
                    raise error_for_code(msg[Key.CODE], msg[Key.MESSAGE], rid)
        finally:
            # A stream abandoned after its client closed (collected late) has nobody to cancel it
            # for: the supervisor cancels a gone client's requests itself.
            if not finished and not self._sock.closed:
                self._abandoned.add(rid)
                self._inbox.pop(rid, None)
                cancel_id = next(self._ids)
                self._abandoned.add(cancel_id)  # nobody waits for the cancel's own result
                self._sock.send(encode(m.request(Op.CANCEL, cancel_id, target=rid)))

    def generate(self, prompt: str | None = None, **kwargs: Any) -> str:
        """The whole completion as one string."""
        return "".join(ev.text for ev in self.stream(prompt, **kwargs) if isinstance(ev, Token))
