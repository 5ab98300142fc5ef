"""The asyncio client for protocol v1, on zmq.asyncio: the same operations as `Client`.

    async with AsyncClient() as c:
        async for text in c.generate("Why is the sky blue?", max_tokens=64):
            print(text, end="", flush=True)
        done = await c.complete("Name three rivers.", temperature=0)

One reader task routes replies to the requests waiting for them, so any number of requests
(tasks) share one socket. Breaking out of an `async for`, or cancelling the task that reads a
stream, cancels the request on the supervisor. A supervisor that restarts is survived as with
`Client` (see client_core); one that stays silent for `timeout` raises Unreachable.
"""

from __future__ import annotations

import asyncio
from collections import deque
import os
import time
from typing import Any, AsyncIterator, Mapping, Sequence

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from stoker.protocol import messages as m
from stoker.protocol.client_core import Reply, Step
from stoker.protocol.errors import StokerError, Timeout, Unreachable
from stoker.protocol.messages import Key, Message, Op, RequestId
from stoker.protocol.replies import (
    ClientSocket, Completion, Embeddings, End, Info, StreamBase, Token, embed_keys, embeddings_of, event_of,
    generate_keys, load_keys,
)

__all__ = ["AsyncClient", "AsyncStream"]


class AsyncStream(StreamBase):
    """One generate request in flight (sent when created). `async for` gives its token texts;
    `events()` gives Info, Token and End; `end` is set once it has ended."""

    def __init__(self, client: "AsyncClient", rid: RequestId) -> None:
        super().__init__(client, rid)
        self._replies = client._queues[rid]

    async def __aiter__(self) -> AsyncIterator[str]:
        async for ev in self.events():
            if isinstance(ev, Token):
                yield ev.text

    async def events(self) -> AsyncIterator[Token | Info | End]:
        with self._cancel_if_left():  # also on task cancellation
            while not self._done:
                for ev in self._take(await self.client._next(self.id, self._replies)):
                    yield ev

    async def complete(self) -> Completion:
        return self._completion("".join([t async for t in self]))


class AsyncClient(ClientSocket):
    """One DEALER socket; use it from one event loop. `timeout`, `server_key` and `client_key`
    as for `Client`."""

    def __init__(self, endpoint: str | None = None, *, timeout: float | None = 30.0,
                 server_key: str | os.PathLike[str] | bytes | None = None,
                 client_key: str | os.PathLike[str] | None = None) -> None:
        super().__init__(zmq.asyncio.Context.instance(), endpoint, timeout, server_key, client_key)
        self._queues: dict[RequestId, asyncio.Queue[Reply]] = {}
        self._tasks: list[asyncio.Task] = []  # the reader and the connection watcher
        # Requests waiting for room in the socket's queue (the supervisor reads slower than we
        # send), each with the time after which it is given up on: sent in order by _flush.
        self._backlog: deque[tuple[RequestId, bytes, float | None]] = deque()
        self._flusher: asyncio.Task | None = None
        self._probe_done: asyncio.Event | None = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._flusher is not None:
            self._tasks.append(self._flusher)
            self._flusher = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks = []
        self._close_sockets()

    # ---- plumbing ------------------------------------------------------------------------------

    def send(self, op: Op, **keys: Any) -> RequestId:
        """Send a request; returns its id. Its replies queue until read with `_next`. As with
        `Client.send`, a request the supervisor does not take within the timeout (its queue to
        us stays full) ends with Unreachable; until then it waits its turn, in order."""
        rid, frame = self.core.request(op, keys)  # BadRequest before anything is kept
        self._queues[rid] = asyncio.Queue()
        sent = False
        if not self._backlog:
            try:
                self._send_now(frame)
                sent = True
            except zmq.Again:
                pass
        if not sent:
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            self.core.hold(rid)  # not judged lost by a ping's result while it waits here
            self._backlog.append((rid, frame, deadline))
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.get_running_loop().create_task(self._flush())
        if not self._tasks or any(t.done() for t in self._tasks):
            loop = asyncio.get_running_loop()
            for task in self._tasks:
                if not task.done():
                    task.cancel()
            self._tasks = [loop.create_task(self._read()), loop.create_task(self._watch())]
        return rid

    def _send_now(self, frame: bytes) -> None:
        """Send without waiting (a DEALER queues up to its HWM), so requests and cancels go out
        synchronously, even from the finally block of a cancelled task. zmq.asyncio tries a
        DONTWAIT send first and wakes pending receivers (its fd is edge-triggered), so this goes
        through the asyncio socket, not a sync shadow of it."""
        done = self._sock.send(frame, zmq.NOBLOCK)
        error = done.exception() if done.done() else None
        if error is not None:
            raise error

    async def _flush(self) -> None:
        """Send what waits for room, in order, as the socket takes it."""
        while self._backlog:
            rid, frame, deadline = self._backlog[0]
            if not self.core.in_flight(rid):  # cancelled (or its reader gone) meanwhile
                self._backlog.popleft()
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self._backlog.popleft()
                self.core.forget(rid)
                queue = self._queues.pop(rid, None)
                if queue is not None:
                    queue.put_nowait(Unreachable(f"the supervisor at {self.endpoint} takes no requests "
                                                 f"(for {self.timeout:g} s)", rid))
                continue
            try:
                self._send_now(frame)  # room again: no waiting task per frame
            except zmq.Again:
                try:
                    await asyncio.wait_for(self._sock.send(frame), left)  # waits for room
                except asyncio.TimeoutError:
                    continue  # given up on at the top of the loop
            self._backlog.popleft()
            self.core.sent(rid)

    async def _read(self) -> None:
        while True:
            frame = await self._sock.recv()
            try:
                step = self.core.receive(frame)
            except StokerError as exc:
                # Whose reply it was cannot be known: every request in flight gets the error,
                # rather than one of them waiting for ever.
                step = Step(replies=[(rid, exc) for rid in list(self.core.pending)])
                for rid in list(self.core.pending):
                    self.core.forget(rid)
            self._apply(step)

    async def _watch(self) -> None:
        """The connection dropped (the supervisor died or restarted): probe at once."""
        while True:
            parse_monitor_message(await self._monitor.recv_multipart())
            self.core.disconnected()
            self._start_probe()

    def _apply(self, step: Step) -> None:
        for rid, reply in step.replies:
            queue = self._queues.get(rid)
            if queue is None:
                continue  # abandoned or cancelled: drop it
            queue.put_nowait(reply)
            if isinstance(reply, StokerError) or m.is_terminal(reply):
                self._queues.pop(rid, None)
        for rid, frame in step.send:
            try:
                self._send_now(frame)
            except zmq.ZMQError:  # its pipe is full: the supervisor reads nothing
                self.core.forget(rid)
                queue = self._queues.pop(rid, None)
                if queue is not None:
                    queue.put_nowait(self._unreachable(self.timeout, rid))
        if self.core.probing is None and self._probe_done is not None:
            self._probe_done.set()

    def _start_probe(self) -> None:
        started = self.core.probe()
        if started is not None:
            if self._probe_done is None or self._probe_done.is_set():
                self._probe_done = asyncio.Event()  # else it replaces a probe lost with its connection
            self._apply(Step(send=[started]))

    async def _next(self, rid: RequestId, queue: "asyncio.Queue[Reply]", timeout: float | None = None,
                    probe: bool = True) -> Message:
        """The next reply of a request, from its queue (the reader drops the queue from its
        routing table at the terminal reply; the request keeps reading it)."""
        limit = self.timeout if timeout is None else timeout
        while True:
            if queue.empty():
                for task in self._tasks:
                    if task.done():
                        task.result()  # the reader died: raise why
            if not queue.empty():
                reply = queue.get_nowait()
                if isinstance(reply, StokerError):
                    raise reply
                return reply
            # Not asyncio.wait_for: before Python 3.12 it can swallow a cancellation that arrives
            # as the reply does, and a cancelled task would then read an endless stream for ever.
            getter = asyncio.ensure_future(queue.get())
            try:
                done, _ = await asyncio.wait({getter}, timeout=limit)
            finally:
                if not getter.done():
                    getter.cancel()
            if done:
                reply = getter.result()
                if isinstance(reply, StokerError):
                    raise reply
                return reply
            assert limit is not None
            if not probe:
                self._forget(rid)
                raise Timeout(f"no reply from the supervisor at {self.endpoint} for {limit:g} s", rid)
            if await self._alive(limit):
                continue  # silent but alive: the request waits its turn
            # Given up on: cancel it too, so that a request still waiting in the socket's queue
            # (no supervisor to take it yet) is not run for nobody once one comes.
            self._cancel_quietly(rid)
            self._forget(rid)
            raise self._unreachable(limit, rid)

    def _forget(self, rid: RequestId) -> None:
        self._queues.pop(rid, None)
        self.core.forget(rid)

    async def _alive(self, within: float) -> bool:
        """Whether the supervisor answers a probe within `within` seconds of its sending."""
        self._start_probe()
        event = self._probe_done
        if self.core.probing is None or event is None:
            return True
        left = self.core.probe_sent + within - time.monotonic()
        try:
            await asyncio.wait_for(event.wait(), max(0.0, left))
        except asyncio.TimeoutError:
            self.core.probe_failed()
            return False
        return True

    async def call(self, op: Op, timeout: float | None = None, probe: bool = True, **keys: Any) -> dict[str, Any]:
        """A request answered by one `result`; returns its data."""
        rid = self.send(op, **keys)
        try:
            result = event_of(await self._next(rid, self._queues[rid], timeout, probe))  # raises for an error
        finally:
            self._queues.pop(rid, None)
        assert isinstance(result, dict), result
        return result

    def _cancel_quietly(self, rid: RequestId) -> None:
        if self._queues.pop(rid, None) is None or not self.core.in_flight(rid):
            return  # it had ended already (or was never routed): nothing to cancel
        self.core.forget(rid)
        if not self.closed:
            try:
                _, frame = self.core.request(Op.CANCEL, {Key.TARGET: rid}, quiet=True)
                self._send_now(frame)
            except zmq.ZMQError:
                pass  # its pipe is full: the supervisor is not reading; nothing to do now

    # ---- generating ----------------------------------------------------------------------------

    def generate(self, prompt: str | None = None, *, messages: list[Mapping[str, str]] | None = None,
                 model: str | None = None, **sampling: Any) -> AsyncStream:
        """Start a request (sent now) and return its stream: `async for` it for token texts.
        Needs a running event loop."""
        return AsyncStream(self, self.send(Op.GENERATE, **generate_keys(prompt, messages, model, sampling)))

    async def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        """The whole completion, with why it ended, usage and timings. Cancelling the awaiting
        task cancels the request."""
        return await self.generate(prompt, **kwargs).complete()

    async def embed(self, input: str | Sequence[str], *, model: str | None = None, normalize: bool = True,
                    truncate: bool = False, **keys: Any) -> Embeddings:
        """As Client.embed; cancelling the awaiting task cancels the request."""
        rid = self.send(Op.EMBED, **embed_keys(input, model, normalize, truncate, keys))
        queue = self._queues[rid]  # the reader drops it from its table at the terminal reply
        try:
            while True:
                done = embeddings_of(rid, await self._next(rid, queue))
                if done is not None:
                    return done
        finally:
            if self.core.in_flight(rid):
                self._cancel_quietly(rid)
            self._queues.pop(rid, None)

    async def cancel(self, request: AsyncStream | RequestId) -> bool:
        """Cancel one of this client's generate requests; False if it had already finished.
        A stream being read goes on to its end, `reason = "cancelled"`."""
        rid = request.id if isinstance(request, AsyncStream) else request
        return bool((await self.call(Op.CANCEL, target=rid)).get(Key.CANCELLED))

    # ---- other ops -----------------------------------------------------------------------------

    async def ping(self, timeout: float = 2.0) -> dict[str, Any]:
        self._check_socket_file()
        try:
            return await self.call(Op.PING, timeout=timeout, probe=False)
        except Timeout:
            raise self._no_pong(timeout) from None

    async def status(self) -> dict[str, Any]:
        return await self.call(Op.STATUS)

    async def models(self) -> dict[str, Any]:
        return await self.call(Op.MODELS)

    async def load(self, model: str, pin: bool = False, keep_alive: float | None = None) -> dict[str, Any]:
        return await self.call(Op.LOAD, **load_keys(model, pin, keep_alive))

    async def unload(self, model: str) -> dict[str, Any]:
        return await self.call(Op.UNLOAD, model=model)

    async def shutdown(self) -> dict[str, Any]:
        return await self.call(Op.SHUTDOWN)
