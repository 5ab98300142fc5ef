"""The asyncio client for protocol v1, on zmq.asyncio: the same operations as `Client`.

    async with AsyncClient() as c:
        async for text in c.generate("Why is the sky blue?", max_tokens=64):
            print(text, end="", flush=True)
        done = await c.complete("Name three rivers.", temperature=0)

One reader task routes replies to the requests waiting for them, so any number of requests
(tasks) share one socket. Breaking out of an `async for`, or cancelling the task that reads a
stream, cancels the request on the supervisor. Silence longer than `timeout` raises Timeout.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Mapping

import zmq
import zmq.asyncio

from stoker.protocol import messages as m
from stoker.protocol.errors import Cancelled, StokerError, Timeout, Unreachable
from stoker.protocol.messages import ErrorCode, Key, Message, Op, RequestId
from stoker.protocol.replies import PROBE_S, ClientSocket, Completion, End, Info, Token, event_of, generate_keys, load_keys

__all__ = ["AsyncClient", "AsyncStream"]


class AsyncStream:
    """One generate request in flight (sent when created). `async for` gives its token texts;
    `events()` gives Info, Token and End; `end` is set once it has ended."""

    def __init__(self, client: "AsyncClient", rid: RequestId) -> None:
        self.client = client
        self.id = rid
        self.end: End | None = None
        self._done = False
        self._replies = client._queues[rid]

    async def __aiter__(self) -> AsyncIterator[str]:
        async for ev in self.events():
            if isinstance(ev, Token):
                yield ev.text

    async def events(self) -> AsyncIterator[Token | Info | End]:
        try:
            while not self._done:
                msg = await self.client._next(self.id, self._replies)
                if m.is_terminal(msg):
                    self._done = True
                ev = event_of(msg)  # raises for an error
                if isinstance(ev, End):
                    self.end = ev
                if isinstance(ev, (Token, Info, End)):
                    yield ev
        finally:  # also on break (the generator is closed) and on task cancellation
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
            except Exception:  # the loop or the interpreter is going away
                pass

    async def complete(self) -> Completion:
        text = "".join([t async for t in self])
        if self.end is None:
            raise Cancelled(f"request {self.id!r} was cancelled before it ended", self.id)
        return Completion(self.id, text, self.end.reason, self.end.usage, self.end.timings)


class AsyncClient(ClientSocket):
    """One DEALER socket; use it from one event loop. `timeout` as for `Client`: a request
    silent that long is waited for if the supervisor answers a ping, else raises Timeout."""

    def __init__(self, endpoint: str | None = None, *, timeout: float | None = 30.0) -> None:
        super().__init__(zmq.asyncio.Context.instance(), endpoint, timeout)
        self._queues: dict[RequestId, asyncio.Queue[Message]] = {}
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
            self._reader = None
        self._sock.close()

    # ---- plumbing ------------------------------------------------------------------------------

    def send(self, op: Op, **keys: Any) -> int:
        """Send a request now; returns its id. Its replies queue until read with `_next`."""
        rid = next(self._ids)
        frame = self._frame(op, rid, keys)  # BadRequest before anything is kept
        self._queues[rid] = asyncio.Queue()
        try:
            self._send_now(frame)
        except zmq.Again:
            del self._queues[rid]
            raise Unreachable(f"the supervisor at {self.endpoint} takes no requests (its queue to us is full)",
                              rid) from None
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())
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

    async def _read(self) -> None:
        while True:
            frame = await self._sock.recv()
            try:
                msg = self._decode(frame)
            except StokerError as exc:
                # Whose reply it was cannot be known: every request in flight gets the error,
                # rather than one of them waiting for ever.
                for rid, queue in list(self._queues.items()):
                    queue.put_nowait(m.error(rid, ErrorCode.INTERNAL, exc.message))
                self._queues.clear()
                continue
            queue = self._queues.get(msg.get(Key.ID))
            if queue is not None:  # else: abandoned or cancelled; drop it
                queue.put_nowait(msg)
                if m.is_terminal(msg):
                    self._queues.pop(msg[Key.ID], None)

    async def _next(self, rid: RequestId, queue: "asyncio.Queue[Message]", timeout: float | None = None,
                    probe: bool = True) -> Message:
        """The next reply of a request, from its queue (the reader drops the queue from its
        routing table at the terminal reply; the request keeps reading it)."""
        if self._reader is not None and self._reader.done() and queue.empty():
            self._reader.result()  # the reader died: raise why
        limit = self.timeout if timeout is None else timeout
        while True:
            if not queue.empty():
                return queue.get_nowait()
            # Not asyncio.wait_for: before Python 3.12 it can swallow a cancellation that arrives
            # as the reply does, and a cancelled task would then read an endless stream for ever.
            getter = asyncio.ensure_future(queue.get())
            try:
                done, _ = await asyncio.wait({getter}, timeout=limit)
            finally:
                if not getter.done():
                    getter.cancel()
            if done:
                return getter.result()
            assert limit is not None
            if probe and await self._alive(min(limit, PROBE_S)):
                continue  # silent but alive: the request waits its turn
            self._queues.pop(rid, None)
            raise Timeout(f"no reply from the supervisor at {self.endpoint} for {limit:g} s", rid)

    async def _alive(self, within: float) -> bool:
        try:
            await self.call(Op.PING, timeout=within, probe=False)
            return True
        except (Timeout, Unreachable):
            return False

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
        if self._queues.pop(rid, None) is None:
            return  # it had ended already (or was never routed): nothing to cancel
        if not self.closed:
            try:
                self._send_now(self._frame(Op.CANCEL, next(self._ids), {"target": rid}))
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

    async def cancel(self, request: AsyncStream | RequestId) -> bool:
        """Cancel one of this client's generate requests; False if it had already finished.
        A stream being read goes on to its end, `reason = "cancelled"`."""
        rid = request.id if isinstance(request, AsyncStream) else request
        return bool((await self.call(Op.CANCEL, target=rid)).get(Key.CANCELLED))

    # ---- other ops -----------------------------------------------------------------------------

    async def ping(self, timeout: float = 2.0) -> dict[str, Any]:
        self._check_socket_file()
        try:
            return await self.call(Op.PING, timeout=timeout)
        except Timeout:
            raise Unreachable(f"no supervisor answered at {self.endpoint} within {timeout:g} s") from None

    async def status(self) -> dict[str, Any]:
        return await self.call(Op.STATUS)

    async def models(self) -> dict[str, Any]:
        return await self.call(Op.MODELS)

    async def load(self, model: str, pin: bool = False) -> dict[str, Any]:
        return await self.call(Op.LOAD, **load_keys(model, pin))

    async def unload(self, model: str) -> dict[str, Any]:
        return await self.call(Op.UNLOAD, model=model)

    async def shutdown(self) -> dict[str, Any]:
        return await self.call(Op.SHUTDOWN)
