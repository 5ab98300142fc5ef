"""The blocking client for protocol v1 (the CLI uses it; so may any program).

    with Client() as c:
        for text in c.generate("Why is the sky blue?", max_tokens=64):
            print(text, end="", flush=True)
        done = c.complete("Name three rivers.", temperature=0)
        print(done.text, done.usage, done.timings)

Requests pipeline: `generate` sends at once and returns a stream, so many can be in flight on
one socket and be read in any order. Leaving a stream early (breaking out of the loop) cancels
the request. Errors raise the StokerError subclass of their wire code (`UnknownModel`,
`Overloaded`, ...); silence longer than `timeout` raises Timeout; a supervisor that never
answers a ping raises Unreachable. For asyncio, see `stoker.protocol.async_client.AsyncClient`.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Iterator, Mapping

import zmq

from stoker.protocol import messages as m
from stoker.protocol.codec import decode, encode
from stoker.protocol.errors import Timeout, Unreachable
from stoker.protocol.messages import Key, Message, Op, RequestId
from stoker.protocol.replies import ClientSocket, Completion, End, Info, Token, event_of, generate_keys, load_keys

__all__ = ["Client", "Completion", "End", "Info", "Stream", "Token"]


class Stream:
    """One generate request in flight. Iterate for its token texts (or `events()` for Token,
    Info and End); `end` is set once it has ended. Leaving the loop early cancels it."""

    def __init__(self, client: "Client", rid: RequestId) -> None:
        self.client = client
        self.id = rid
        self.end: End | None = None
        self._done = False

    def __iter__(self) -> Iterator[str]:
        for ev in self.events():
            if isinstance(ev, Token):
                yield ev.text

    def events(self) -> Iterator[Token | Info | End]:
        """Info and Token events, then one End. A new generator each call: dropping it before
        the End (a `break`) cancels the request."""
        try:
            while not self._done:
                msg = self.client.recv(self.id)
                if m.is_terminal(msg):
                    self._done = True
                ev = event_of(msg)  # raises for an error
                if isinstance(ev, End):
                    self.end = ev
                if isinstance(ev, (Token, Info, End)):
                    yield ev
        finally:
            if not self._done:
                self.cancel()

    def cancel(self) -> None:
        """Stop the request; its remaining replies are dropped."""
        if not self._done:
            self._done = True
            self.client._cancel_quietly(self.id)

    def complete(self) -> Completion:
        """Wait for the whole text."""
        text = "".join(self)
        assert self.end is not None
        return Completion(self.id, text, self.end.reason, self.end.usage, self.end.timings)


class Client(ClientSocket):
    """One DEALER socket to the supervisor. Not thread-safe: use one Client per thread."""

    def __init__(self, endpoint: str | None = None, *, timeout: float | None = 600.0) -> None:
        super().__init__(zmq.Context.instance(), endpoint, timeout)
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
                self._abandoned.add(rid)  # its replies may still come: drop them then
                raise Timeout(f"no reply from the supervisor at {self.endpoint} for {limit:g} s", rid)
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
        result = event_of(self.recv(rid, timeout))  # raises for an error
        assert isinstance(result, dict), result
        return result

    def _cancel_quietly(self, rid: RequestId) -> None:
        # A stream dropped after its client closed has nobody to cancel it for: the supervisor
        # cancels a gone client's requests itself.
        self._abandoned.add(rid)
        self._inbox.pop(rid, None)
        if not self.closed:
            cancel_id = next(self._ids)
            self._abandoned.add(cancel_id)  # nobody waits for the cancel's own result
            self._sock.send(encode(m.request(Op.CANCEL, cancel_id, target=rid)))

    # ---- generating ----------------------------------------------------------------------------

    def generate(self, prompt: str | None = None, *, messages: list[Mapping[str, str]] | None = None,
                 model: str | None = None, **sampling: Any) -> Stream:
        """Start a request (sent now) and return its stream: iterate it for token texts."""
        return Stream(self, self.send(Op.GENERATE, **generate_keys(prompt, messages, model, sampling)))

    def stream(self, prompt: str | None = None, **kwargs: Any) -> Iterator[Token | Info | End]:
        """Start a request and return its events (Info, Token, then one End)."""
        return self.generate(prompt, **kwargs).events()

    def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        """The whole completion, with why it ended, usage and timings."""
        return self.generate(prompt, **kwargs).complete()

    def cancel(self, request: Stream | RequestId) -> bool:
        """Cancel one of this client's generate requests; False if it had already finished."""
        rid = request.id if isinstance(request, Stream) else request
        if isinstance(request, Stream):
            request._done = True
        found = bool(self.call(Op.CANCEL, target=rid).get(Key.CANCELLED))
        self._abandoned.add(rid)  # its end (cancelled) is not for anyone now
        pending = self._inbox.pop(rid, deque())
        if any(m.is_terminal(x) for x in pending):
            self._abandoned.discard(rid)
        return found

    # ---- other ops -----------------------------------------------------------------------------

    def ping(self, timeout: float = 2.0) -> dict[str, Any]:
        """Raise Unreachable unless a supervisor answers within `timeout` seconds."""
        self._check_socket_file()
        try:
            return self.call(Op.PING, timeout=timeout)
        except Timeout:
            raise Unreachable(f"no supervisor answered at {self.endpoint} within {timeout:g} s") from None

    def status(self) -> dict[str, Any]:
        return self.call(Op.STATUS)

    def models(self) -> dict[str, Any]:
        return self.call(Op.MODELS)

    def load(self, model: str, pin: bool = False) -> dict[str, Any]:
        """Load a model and wait until it is ready (with `pin`, keep it loaded until `unload`)."""
        return self.call(Op.LOAD, **load_keys(model, pin))

    def unload(self, model: str) -> dict[str, Any]:
        return self.call(Op.UNLOAD, model=model)

    def shutdown(self) -> dict[str, Any]:
        return self.call(Op.SHUTDOWN)
