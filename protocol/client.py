"""The blocking client for protocol v1 (the CLI uses it; so may any program).

    with Client() as c:
        for text in c.generate("Why is the sky blue?", max_tokens=64):
            print(text, end="", flush=True)
        done = c.complete("Name three rivers.", temperature=0)
        print(done.text, done.usage, done.timings)

Requests pipeline: `generate` sends at once and returns a stream, so many can be in flight on
one socket and be read in any order. Leaving a stream early (breaking out of the loop) cancels
the request. Errors raise the StokerError subclass of their wire code (`UnknownModel`,
`Overloaded`, ...). A supervisor that restarts is survived: requests it lost are sent again,
streams going on where they stood (see client_core). One that stays away raises Unreachable.
For asyncio, see `stoker.protocol.async_client.AsyncClient`.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any, Iterator, Mapping, Sequence

import zmq
from zmq.utils.monitor import recv_monitor_message

from stoker.protocol import messages as m
from stoker.protocol.client_core import Reply, Step
from stoker.protocol.errors import Cancelled, StokerError, Timeout, Unreachable
from stoker.protocol.messages import Key, Message, Op, RequestId
from stoker.protocol.replies import (
    ClientSocket, Completion, Embeddings, End, Info, StreamBase, Token, embed_keys, embeddings_of, event_of,
    generate_keys, load_keys,
)

__all__ = ["Client", "Completion", "Embeddings", "End", "Info", "Stream", "Token"]


class Stream(StreamBase):
    """One generate request in flight. Iterate for its token texts (or `events()` for Token,
    Info and End); `end` is set once it has ended. Leaving the loop early cancels it, and so
    does dropping a stream that was never read to its end."""

    def __iter__(self) -> Iterator[str]:
        for ev in self.events():
            if isinstance(ev, Token):
                yield ev.text

    def events(self) -> Iterator[Token | Info | End]:
        """Info and Token events, then one End. A new generator each call: dropping it before
        the End (a `break`) cancels the request."""
        with self._cancel_if_left():
            while not self._done:
                yield from self._take(self.client.recv(self.id))

    def complete(self) -> Completion:
        """Wait for the whole text."""
        return self._completion("".join(self))


class Client(ClientSocket):
    """One DEALER socket to the supervisor. Not thread-safe: use one Client per thread.

    `timeout`: how long the supervisor may stay silent. A request silent that long makes the
    client ping the supervisor: a live one is waited for (a queued request may wait long), one
    that does not answer within `timeout` either raises Unreachable. None waits for ever.
    `server_key` and `client_key` (or STOKER_SERVER_KEY and STOKER_CLIENT_KEY) reach a
    supervisor secured with CurveZMQ (see `stoker keys`).
    """

    def __init__(self, endpoint: str | None = None, *, timeout: float | None = 30.0,
                 server_key: str | os.PathLike[str] | bytes | None = None,
                 client_key: str | os.PathLike[str] | None = None) -> None:
        super().__init__(zmq.Context.instance(), endpoint, timeout, server_key, client_key)
        self._inbox: dict[Any, deque[Reply]] = {}
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._close_sockets()

    # ---- plumbing ------------------------------------------------------------------------------

    def send(self, op: Op, quiet: bool = False, **keys: Any) -> RequestId:
        """Send a request; returns its id. Raises BadRequest if it cannot be encoded, and
        Unreachable if the supervisor does not take it within the timeout."""
        rid, frame = self.core.request(op, keys, quiet=quiet)
        limit = self.timeout
        if not self._sock.poll(None if limit is None else int(limit * 1000) + 1, zmq.POLLOUT):
            self.core.forget(rid)
            raise Unreachable(f"the supervisor at {self.endpoint} takes no requests (for {limit:g} s)", rid)
        self._sock.send(frame, zmq.NOBLOCK)
        return rid

    def recv(self, rid: Any, timeout: float | None = None, probe: bool = True) -> Message:
        """The next reply for request `rid`, keeping other requests' replies for later. After
        `timeout` (the client's) of silence, the supervisor is probed; with `probe` False,
        Timeout is raised instead."""
        limit = self.timeout if timeout is None else timeout
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            waiting = self._inbox.get(rid)
            if waiting:
                reply = waiting.popleft()
                if not waiting:
                    del self._inbox[rid]
                if isinstance(reply, StokerError):
                    raise reply
                return reply
            if not self.core.in_flight(rid):
                raise Cancelled(f"request {rid!r} is no longer in flight on this client", rid)
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                assert limit is not None
                if not probe:
                    self.core.forget(rid)
                    raise Timeout(f"no reply from the supervisor at {self.endpoint} for {limit:g} s", rid)
                if not self._alive(limit):
                    # Given up on: cancel it too, so that a request still waiting in the socket's
                    # queue (no supervisor to take it yet) is not run for nobody once one comes.
                    self._cancel_quietly(rid)
                    self.core.forget(rid)
                    raise self._unreachable(limit, rid)
                deadline = time.monotonic() + limit  # silent but alive: the request waits its turn
                continue
            self._pump(wait)

    def _pump(self, wait: float | None) -> None:
        """Wait up to `wait` seconds for something to read; read all there is."""
        events = dict(self._poller.poll(None if wait is None else int(wait * 1000) + 1))
        if self._monitor in events:
            while self._monitor.poll(0):
                recv_monitor_message(self._monitor)
            # The connection dropped: find out now whether the supervisor still has our requests.
            self.core.disconnected()
            started = self.core.probe()
            if started is not None:
                self._send_step(Step(send=[started]))
        while self._sock.poll(0):
            try:
                step = self.core.receive(self._sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            except StokerError as exc:
                # Whose reply it was cannot be known: every request in flight gets the error,
                # rather than one of them waiting for ever.
                for rid in list(self.core.pending):
                    self.core.forget(rid)
                    self._inbox.setdefault(rid, deque()).append(exc)
                continue
            self._send_step(step)

    def _send_step(self, step: Step) -> None:
        for rid, reply in step.replies:
            self._inbox.setdefault(rid, deque()).append(reply)
        for rid, frame in step.send:
            try:
                self._sock.send(frame, zmq.NOBLOCK)
            except zmq.Again:  # its pipe is full: the supervisor reads nothing
                self.core.forget(rid)
                self._inbox.setdefault(rid, deque()).append(self._unreachable(self.timeout, rid))

    def _alive(self, within: float) -> bool:
        """Whether the supervisor answers a probe within `within` seconds (one already sent
        counts from when it was sent). Requests it lost are sent again on the way."""
        started = self.core.probe()
        if started is not None:
            self._send_step(Step(send=[started]))
        deadline = self.core.probe_sent + within
        while self.core.probing is not None:
            wait = deadline - time.monotonic()
            if wait <= 0:
                self.core.probe_failed()
                return False
            self._pump(wait)
        return True

    def call(self, op: Op, timeout: float | None = None, probe: bool = True, **keys: Any) -> dict[str, Any]:
        """A request answered by one `result`; returns its data."""
        rid = self.send(op, **keys)
        result = event_of(self.recv(rid, timeout, probe))  # raises for an error
        assert isinstance(result, dict), result
        return result

    def _cancel_quietly(self, rid: RequestId) -> None:
        """Cancel without waiting for the answer; drop what the request still gets."""
        pending = self._inbox.pop(rid, deque())
        if not self.core.in_flight(rid) or any(isinstance(x, dict) and m.is_terminal(x) for x in pending):
            return  # it had ended already: nothing more will come
        self.core.forget(rid)
        # A stream dropped after its client closed has nobody to cancel it for: the supervisor
        # cancels a gone client's requests itself.
        if not self.closed:
            try:
                _, frame = self.core.request(Op.CANCEL, {Key.TARGET: rid}, quiet=True)
                self._sock.send(frame, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # its pipe is full: the supervisor is not reading; nothing to do now

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

    def embed(self, input: str | Sequence[str], *, model: str | None = None, normalize: bool = True,
              truncate: bool = False, **keys: Any) -> Embeddings:
        """One vector per input (a string, or a list of up to 256), unit length unless
        `normalize=False`; `truncate=True` cuts inputs longer than the model takes instead of
        refusing them. `keys`: priority, deadline, keep_alive. Interrupted, it is cancelled."""
        rid = self.send(Op.EMBED, **embed_keys(input, model, normalize, truncate, keys))
        try:
            while True:
                done = embeddings_of(rid, self.recv(rid))
                if done is not None:
                    return done
        finally:
            if self.core.in_flight(rid):
                self._cancel_quietly(rid)

    def cancel(self, request: Stream | RequestId) -> bool:
        """Cancel one of this client's generate requests; False if it had already finished.
        A stream being read goes on to its end, `reason = "cancelled"`."""
        rid = request.id if isinstance(request, Stream) else request
        return bool(self.call(Op.CANCEL, target=rid).get(Key.CANCELLED))

    # ---- other ops -----------------------------------------------------------------------------

    def ping(self, timeout: float = 2.0) -> dict[str, Any]:
        """Raise Unreachable unless a supervisor answers within `timeout` seconds."""
        self._check_socket_file()
        try:
            return self.call(Op.PING, timeout=timeout, probe=False)
        except Timeout:
            raise self._no_pong(timeout) from None

    def status(self) -> dict[str, Any]:
        return self.call(Op.STATUS)

    def models(self) -> dict[str, Any]:
        return self.call(Op.MODELS)

    def load(self, model: str, pin: bool = False, keep_alive: float | None = None) -> dict[str, Any]:
        """Load a model and wait until it is ready (with `pin`, keep it loaded until `unload`; with
        `keep_alive`, unload it after that many seconds idle)."""
        return self.call(Op.LOAD, **load_keys(model, pin, keep_alive))

    def unload(self, model: str) -> dict[str, Any]:
        return self.call(Op.UNLOAD, model=model)

    def shutdown(self) -> dict[str, Any]:
        return self.call(Op.SHUTDOWN)
