"""The Python client library (Client and AsyncClient) against real supervisors."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import msgpack
import pytest
import zmq

from stoker.protocol import errors
from stoker.protocol.async_client import AsyncClient
from stoker.protocol.client import Client, Completion, End, Info, Token
from stoker.protocol.messages import ErrorCode
from stoker.workers.fake_backend import complete as fake_complete
from tests.conftest import FAKE_MODELS, wait_for


def expected(prompt: str, n: int, seed: int = 0) -> str:
    return "".join(fake_complete(prompt, seed, n)[0])


def idle_soon(sup, model: str, within: float = 3.0) -> None:
    wait_for(lambda: [w["state"] for w in sup.workers(model)] == ["idle"], within, f"'{model}' to be idle")


# ---- blocking client ----------------------------------------------------------------------------

def test_pipelined_streams_on_one_socket_read_in_any_order(start_supervisor):
    sup = start_supervisor()
    with Client(sup.endpoint, timeout=30) as c:
        streams = [c.generate(f"prompt {i}", model="echo", max_tokens=12) for i in range(10)]
        assert len({s.id for s in streams}) == 10
        for i, s in reversed(list(enumerate(streams))):  # the last sent is read first
            assert "".join(s) == expected(f"prompt {i}", 12)
            assert s.end is not None
            assert s.end.usage["completion_tokens"] == len(fake_complete(f"prompt {i}", 0, 12)[0])
        done = c.complete("whole", model="echo", max_tokens=5)
        assert isinstance(done, Completion) and done.text == expected("whole", 5)
        assert done.reason in ("length", "stop") and set(done.timings) >= {"queued_ms", "ttft_ms", "total_ms"}
        events = list(c.stream("events", model="echo", max_tokens=3))
        assert isinstance(events[-1], End) and all(isinstance(e, (Info, Token)) for e in events[:-1])


def test_breaking_out_of_a_generate_loop_cancels_the_request(start_supervisor):
    sup = start_supervisor()
    with Client(sup.endpoint, timeout=30) as c:
        got = []
        for text in c.generate("go", model="endless", max_tokens=10_000):
            got.append(text)
            if len(got) == 3:
                break
        idle_soon(sup, "endless")  # at 20 tok/s it would have run for minutes
        # the socket is clean: the next request gets its own replies only
        assert c.complete("next", model="echo", max_tokens=4).text == expected("next", 4)
        s = c.generate("again", model="endless", max_tokens=10_000)
        tokens = iter(s)
        next(tokens)
        assert c.cancel(s) is True
        idle_soon(sup, "endless")
        assert c.cancel(s.id) is False  # already finished
        assert c.complete("after", model="echo", max_tokens=2).text == expected("after", 2)


def test_a_silent_supervisor_raises_unreachable_never_hangs(short_dir):
    # A ROUTER that reads and never answers: a supervisor that is alive but stuck, or gone.
    ctx = zmq.Context.instance()
    silent = ctx.socket(zmq.ROUTER)
    endpoint = f"ipc://{short_dir}/silent.sock"
    silent.bind(endpoint)
    try:
        with Client(endpoint, timeout=0.5) as c:
            t0 = time.monotonic()
            with pytest.raises(errors.Unreachable):
                c.complete("x")
            with pytest.raises(errors.Unreachable):
                c.status()
            assert time.monotonic() - t0 < 3
            with pytest.raises(errors.Unreachable):
                c.ping(timeout=0.3)

        async def run() -> None:
            async with AsyncClient(endpoint, timeout=0.5) as ac:
                with pytest.raises(errors.Unreachable):
                    await ac.complete("x")
                with pytest.raises(errors.Unreachable):
                    async for _ in ac.generate("y"):
                        pass
                with pytest.raises(errors.Unreachable):
                    await ac.ping(timeout=0.3)

        t0 = time.monotonic()
        asyncio.run(run())
        assert time.monotonic() - t0 < 3
    finally:
        silent.close()


def test_a_stopped_supervisor_raises_unreachable_and_recovers(start_supervisor):
    sup = start_supervisor()
    with Client(sup.endpoint, timeout=0.5) as c:
        c.load("echo")
        os.kill(sup.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(errors.Unreachable):
                c.complete("x", model="echo", max_tokens=3)
        finally:
            os.kill(sup.proc.pid, signal.SIGCONT)
        c.timeout = 30
        assert c.complete("y", model="echo", max_tokens=3).text == expected("y", 3)


MODELS_FOR_ERRORS = FAKE_MODELS + """
[models.broken]
backend = "fake"
fail_load = "the weights are corrupt"

[models.huge]
backend = "fake"
memory_bytes = "64GiB"

[models.fragile]
backend = "fake"
tokens_per_second = 20
end_every = 0
"""


def test_every_error_code_the_supervisor_sends_raises_its_exception(start_supervisor):
    sup = start_supervisor(MODELS_FOR_ERRORS, max_queue=1, crash_loop_max=0, max_retries=0,
                           ram_budget="32GiB", drain_timeout=1)
    seen: set[ErrorCode] = set()

    def expect(cls: type, call) -> None:
        with pytest.raises(cls) as err:
            call()
        assert err.value.code is cls.code and err.value.message
        seen.add(err.value.code)

    with Client(sup.endpoint, timeout=30) as c:
        expect(errors.BadRequest, lambda: c.complete("x", model="echo", max_tokens=0))
        expect(errors.UnknownModel, lambda: c.complete("x", model="nope"))
        expect(errors.InsufficientMemory, lambda: c.complete("x", model="huge"))
        expect(errors.LoadFailed, lambda: c.complete("x", model="broken"))
        # overloaded: one running, one queued, the third refused (max_queue = 1, same client)
        running = c.generate("r", model="slow", max_tokens=200)
        first = iter(running)  # kept: a dropped iterator cancels its request
        next(first)
        queued = c.generate("q", model="slow", max_tokens=2)
        expect(errors.Overloaded, lambda: c.complete("o", model="slow", max_tokens=2))
        running.cancel()
        queued.cancel()
        # worker_crashed: its worker is killed mid-stream and max_retries is 0
        s = c.generate("f", model="fragile", max_tokens=10_000)
        tokens = iter(s)
        next(tokens)
        [w] = sup.workers("fragile")
        os.kill(w["pid"], signal.SIGKILL)
        expect(errors.WorkerCrashed, lambda: "".join(tokens))
        # shutting_down: work sent while the supervisor drains
        c.shutdown()
        expect(errors.ShuttingDown, lambda: c.complete("late", model="echo"))
    assert seen == {ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_MODEL, ErrorCode.INSUFFICIENT_MEMORY,
                    ErrorCode.LOAD_FAILED, ErrorCode.OVERLOADED, ErrorCode.WORKER_CRASHED,
                    ErrorCode.SHUTTING_DOWN}


def test_every_wire_error_code_maps_to_its_exception_on_a_real_socket(short_dir):
    """unsupported_version, timeout and internal are codes this supervisor sends only to clients
    that speak another version, never, or on a bug: a peer that answers every request with the
    next code checks the client's side of all of them, sync and async."""
    codes = list(ErrorCode)
    ctx = zmq.Context.instance()
    peer = ctx.socket(zmq.ROUTER)
    endpoint = f"ipc://{short_dir}/codes.sock"
    peer.bind(endpoint)
    stop = threading.Event()

    def answer() -> None:
        n = 0
        while not stop.is_set():
            if not peer.poll(50):
                continue
            ident, frame = peer.recv_multipart()
            req = msgpack.unpackb(frame)
            if req["op"] == "cancel":
                continue
            code = codes[n % len(codes)]
            n += 1
            peer.send_multipart([ident, msgpack.packb({"v": 1, "id": req["id"], "ev": "error",
                                                       "code": code.value, "message": f"a {code.value}"})])

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        with Client(endpoint, timeout=5) as c:
            for code in codes:
                with pytest.raises(errors.StokerError) as err:
                    c.complete("x")
                assert err.value.code is code and err.value.message == f"a {code.value}"
                assert type(err.value) is errors.error_for_code(code.value, "").__class__

        async def run() -> None:
            async with AsyncClient(endpoint, timeout=5) as ac:
                for code in codes:
                    with pytest.raises(errors.StokerError) as err:
                        await ac.status()
                    assert err.value.code is code

        asyncio.run(run())
    finally:
        stop.set()
        thread.join(2)
        peer.close()


# ---- asyncio client -----------------------------------------------------------------------------

def test_async_client_pipelines_cancels_on_break_and_on_task_cancel(start_supervisor):
    sup = start_supervisor()

    async def run() -> None:
        async with AsyncClient(sup.endpoint, timeout=30) as c:
            assert (await c.ping())["pong"] is True
            done = await asyncio.gather(*(c.complete(f"a{i}", model="echo", max_tokens=8) for i in range(12)))
            assert [d.text for d in done] == [expected(f"a{i}", 8) for i in range(12)]
            assert [d.usage["completion_tokens"] for d in done] == [len(fake_complete(f"a{i}", 0, 8)[0])
                                                                    for i in range(12)]
            texts = [t async for t in c.generate("s", model="echo", max_tokens=6)]
            assert "".join(texts) == expected("s", 6)  # one frame or several: tokens read together merge

            # break out of an async for
            got = 0
            async for _ in c.generate("b", model="endless", max_tokens=10_000):
                got += 1
                if got == 3:
                    break
            await asyncio.sleep(0)  # let the closed generator's cleanup run
            await asyncio.to_thread(idle_soon, sup, "endless")

            # cancel the task that reads a stream
            async def reader() -> None:
                async for _ in c.generate("t", model="endless", max_tokens=10_000):
                    pass

            task = asyncio.create_task(reader())
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.to_thread(idle_soon, sup, "endless")

            # cancel() by stream, errors as exceptions, the other ops
            s = c.generate("c", model="endless", max_tokens=10_000)
            await s.events().__anext__()
            assert await c.cancel(s) is True
            with pytest.raises(errors.UnknownModel):
                await c.complete("x", model="nope")
            assert (await c.load("slow"))["loaded"] is True
            assert any(w["model"] == "slow" for w in (await c.status())["workers"])
            assert "echo" in {m["name"] for m in (await c.models())["models"]}
            assert (await c.unload("slow"))["unloaded"] is True
            assert (await c.complete("end", model="echo", max_tokens=3)).text == expected("end", 3)

    asyncio.run(run())


# ---- what the second review found --------------------------------------------------------------

def test_a_request_waiting_its_turn_is_not_a_timeout_while_the_supervisor_answers(start_supervisor):
    sup = start_supervisor()
    with Client(sup.endpoint, timeout=30) as ahead, Client(sup.endpoint, timeout=0.5) as patient:
        first = ahead.generate("first", model="slow", max_tokens=40)  # 2 s at 20 tok/s
        tokens = iter(first)
        next(tokens)
        t0 = time.monotonic()
        done = patient.complete("second", model="slow", max_tokens=4)  # silent while queued: >0.5 s
        assert time.monotonic() - t0 > 1.0 and done.text == expected("second", 4)

        async def run() -> None:
            async with AsyncClient(sup.endpoint, timeout=0.5) as c:
                again = ahead.generate("third", model="slow", max_tokens=40)
                it = iter(again)
                next(it)
                assert (await c.complete("fourth", model="slow", max_tokens=3)).text == expected("fourth", 3)

        asyncio.run(run())


def test_an_oversize_or_unencodable_request_fails_at_once_with_its_own_id(start_supervisor):
    sup = start_supervisor(max_message_bytes=64 * 1024)
    with Client(sup.endpoint, timeout=5) as c:
        t0 = time.monotonic()
        with pytest.raises(errors.BadRequest, match="max_message_bytes"):
            c.complete("x" * 100_000, model="echo")
        with pytest.raises(errors.BadRequest, match="cannot be encoded"):
            c.complete("lone \ud800 surrogate", model="echo")
        assert time.monotonic() - t0 < 2
        assert c.complete("fine", model="echo", max_tokens=2).text == expected("fine", 2)


def test_cancel_by_id_while_another_reader_reads_ends_that_stream_with_cancelled(start_supervisor):
    sup = start_supervisor()
    with Client(sup.endpoint, timeout=10) as c:
        s = c.generate("read", model="endless", max_tokens=10_000)
        events = s.events()
        assert next(e for e in events if isinstance(e, Token)).seq == 0
        assert c.cancel(s.id) is True
        rest = list(events)  # goes on to its end: nothing lost, nothing hangs
        toks = [e for e in rest if isinstance(e, Token)]
        assert [t.seq for t in toks] == list(range(1, 1 + len(toks)))
        assert isinstance(rest[-1], End) and rest[-1].reason == "cancelled"

    async def run() -> None:
        async with AsyncClient(sup.endpoint, timeout=10) as ac:
            stream = ac.generate("aread", model="endless", max_tokens=10_000)

            async def reader() -> str | None:
                async for _ in stream:
                    pass
                return stream.end.reason if stream.end else None

            task = asyncio.create_task(reader())
            await asyncio.sleep(0.3)
            assert await ac.cancel(stream) is True
            assert await asyncio.wait_for(task, 5) == "cancelled"

    asyncio.run(run())


def test_an_unreadable_reply_fails_the_waiting_requests_instead_of_hanging(short_dir):
    ctx = zmq.Context.instance()
    peer = ctx.socket(zmq.ROUTER)
    endpoint = f"ipc://{short_dir}/garbage.sock"
    peer.bind(endpoint)
    stop = threading.Event()

    def garbage() -> None:
        while not stop.is_set():
            if peer.poll(50):
                ident, _ = peer.recv_multipart()
                peer.send_multipart([ident, b"\xc1 not msgpack"])

    thread = threading.Thread(target=garbage, daemon=True)
    thread.start()
    try:
        with Client(endpoint, timeout=5) as c, pytest.raises(errors.Internal, match="cannot read"):
            c.status()

        async def run() -> None:
            async with AsyncClient(endpoint, timeout=5) as ac:
                t0 = time.monotonic()
                with pytest.raises(errors.Internal, match="cannot read"):
                    await ac.status()
                assert time.monotonic() - t0 < 2

        asyncio.run(run())
    finally:
        stop.set()
        thread.join(2)
        peer.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_both_clients_wait_for_room_to_send_then_every_request_is_answered(start_supervisor, kind):
    """A supervisor that reads nothing for a while (stopped) fills the client's socket queue:
    Client and AsyncClient alike wait (up to their timeout) and send in order once it reads."""
    from stoker.protocol.messages import Op

    sup = start_supervisor()
    n = 10_000  # past the socket's high-water mark and the kernel's buffer
    os.kill(sup.proc.pid, signal.SIGSTOP)
    threading.Timer(1.5, os.kill, (sup.proc.pid, signal.SIGCONT)).start()
    started = time.monotonic()
    if kind == "sync":
        with Client(sup.endpoint, timeout=20) as c:
            rids = [c.send(Op.PING) for _ in range(n)]
            assert time.monotonic() - started >= 1.0  # some sends waited for the supervisor
            assert all(c.recv(rid)["data"]["pong"] for rid in rids)
    else:
        async def main() -> None:
            async with AsyncClient(sup.endpoint, timeout=20) as c:
                rids = [c.send(Op.PING) for _ in range(n)]  # returns at once; the rest wait in order
                queues = [(rid, c._queues[rid]) for rid in rids]
                assert c._backlog, "expected some requests to wait for room"
                for rid, queue in queues:
                    assert (await c._next(rid, queue))["data"]["pong"]

        asyncio.run(main())
    assert time.monotonic() - started >= 1.0


def test_the_async_client_gives_up_on_a_supervisor_that_takes_nothing_for_its_timeout(start_supervisor):
    from stoker.protocol.messages import Op

    sup = start_supervisor()
    os.kill(sup.proc.pid, signal.SIGSTOP)
    try:
        async def main() -> None:
            async with AsyncClient(sup.endpoint, timeout=1.0) as c:
                rids = [c.send(Op.PING) for _ in range(20_000)]
                last, queue = rids[-1], c._queues[rids[-1]]
                with pytest.raises(errors.Unreachable):
                    await c._next(last, queue)

        asyncio.run(main())
    finally:
        os.kill(sup.proc.pid, signal.SIGCONT)
