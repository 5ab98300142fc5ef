"""The worker process: load one model, then serve generate requests from the supervisor.

Forked by the supervisor's forkserver. It talks to the supervisor over a DEALER socket (see
stoker.workers.wire), and streams each generation's tokens, end or error over a pipe (see
stoker.workers.stream). It dies with the supervisor: PR_SET_PDEATHSIG on Linux, a
parent-pid check while idle, a write to a stream nobody reads any more, and a heartbeat thread
that exits the process once the supervisor has been silent for the liveness window (it may be
alive but hung, or on another parent).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil
import zmq

from stoker.protocol.codec import decode, encode
from stoker.protocol.errors import BadRequest
from stoker.protocol.messages import Key, Reason
from stoker.workers.stream import frame, write_all
from stoker.workers.wire import (
    HEARTBEAT_SUFFIX, LOAD_MS, MAX_WORKER_FRAME_BYTES, PID, PROGRESS, REQUEST, RESUME, RID, RSS, START, T, W, wmsg,
)
from stoker.workers.embeddings import Embedder, Vectors
from stoker.workers.backend import GenerationRequest, create_backend
from stoker.workers.engine import Emitted, Engine, ended, failed

if TYPE_CHECKING:
    from stoker.supervisor.config import ModelConfig

EXIT_OK = 0
EXIT_LOAD_FAILED = 3
EXIT_ORPHANED = 4  # the supervisor stopped sending heartbeats, or closed the stream
_PR_SET_PDEATHSIG = 1
_IDLE_POLL_MS = 1000


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs; pickled to the child by multiprocessing."""

    wid: str
    model: "ModelConfig"
    backend_endpoint: str
    log_path: str
    parent_pid: int
    # The write end of the generation stream (a multiprocessing Connection: it reaches the child
    # through the forkserver as a file descriptor).
    stream: Any
    liveness: float = 3.0  # seconds of silence from the supervisor after which this worker exits


def run_worker(spec: WorkerSpec) -> None:
    """Process entry point."""
    _redirect_output(spec.log_path)
    # The supervisor owns us: a Ctrl-C in its terminal reaches our process group too, and must not
    # kill a worker behind the supervisor's back.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(spec.parent_pid)
    global _FIRST_PARENT
    _FIRST_PARENT = os.getppid()
    print(f"--- worker {spec.wid} (pid {os.getpid()}) for model {spec.model.name!r} starting", flush=True)
    sys.exit(Worker(spec).run())


def _redirect_output(log_path: str) -> None:
    """Send this process's stdout and stderr (C libraries' too) to its log file.

    The supervisor reads the tail of this file to say why a worker died.
    """
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)


_FIRST_PARENT = 0  # the process that forked us: the supervisor's forkserver (or the supervisor)


def _die_with_parent(supervisor_pid: int) -> None:
    """Die with the process that forked us (the supervisor's forkserver, which exits with the
    supervisor), and do not start at all if the supervisor is already gone."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    # The forkserver exits when the last holder of its "alive" pipe's write end is gone, and
    # CPython hands that end to every child it forks: while any worker held it, a supervisor's
    # death left the forkserver (and so every worker, through the signal above) running. A
    # worker forks nothing through it, so it lets go.
    try:
        from multiprocessing import forkserver

        alive = forkserver._forkserver._forkserver_alive_fd  # type: ignore[attr-defined]
        if alive is not None:
            os.close(alive)
            forkserver._forkserver._forkserver_alive_fd = None  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        pass
    try:
        os.kill(supervisor_pid, 0)
    except ProcessLookupError:  # it died before prctl took effect
        os._exit(EXIT_OK)
    except PermissionError:
        pass


class Heartbeat(threading.Thread):
    """Beats to the supervisor three times per liveness window, from its own socket, so a worker
    busy in a long C call (loading, evaluating a prompt) still shows it is alive; a stopped or
    frozen process beats no more. Listens for the supervisor's beats, and exits the whole process
    once the supervisor has been silent for the window: no orphan keeps a model in memory."""

    def __init__(self, ctx: zmq.Context, spec: WorkerSpec, stream_fd: int) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.ctx = ctx
        self.spec = spec
        self.stream_fd = stream_fd
        self.stopping = threading.Event()
        # Moved by the main thread as its request advances (each token, each prompt batch) and
        # sent with every beat: a worker whose beats go on while this stands still is stuck in
        # a native call (the supervisor's stall_timeout).
        self.progress = 0

    def run(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, (self.spec.wid + HEARTBEAT_SUFFIX).encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.spec.backend_endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        # The stream's read end is the supervisor's alone: once it is closed (the supervisor
        # died, however), the write end reports an error at once. So this worker goes at once,
        # even when PR_SET_PDEATHSIG came too late (its parent died before it was set).
        poller.register(self.stream_fd, zmq.POLLERR)
        interval = self.spec.liveness / 3
        heard = next_beat = time.monotonic()
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    try:
                        sock.send(encode(wmsg(W.HEARTBEAT, **{PROGRESS: self.progress})), zmq.NOBLOCK)
                    except zmq.Again:  # the supervisor is not reading; its silence decides below
                        pass
                    next_beat = now + interval
                # Short slices: the main thread waits for this thread when it exits.
                events = dict(poller.poll(100))
                if events.get(self.stream_fd):
                    print(f"--- worker {self.spec.wid}: the supervisor is gone (its end of the stream closed); "
                          "exiting", flush=True)
                    os._exit(EXIT_ORPHANED)
                if events.get(sock):
                    while sock.poll(0):
                        sock.recv()
                    heard = time.monotonic()
                silent = time.monotonic() - heard
                if silent > self.spec.liveness:
                    print(f"--- worker {self.spec.wid}: no heartbeat from the supervisor for {silent:.1f} s; "
                          "exiting", flush=True)
                    os._exit(EXIT_ORPHANED)
        finally:
            sock.close()


class Worker:
    """One model, one socket and one stream pipe; up to `parallel` requests at once (the engine)."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, spec.wid.encode())
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.connect(spec.backend_endpoint)
        self.stream_fd: int = spec.stream.fileno()
        os.set_inheritable(self.stream_fd, False)  # no process started from here holds the stream open
        self.exit_requested = False
        self.embedder: Embedder | None = None
        # The requests it runs, and whether each has streamed its first token yet.
        self.first_sent: dict[int, bool] = {}
        self.heartbeat = Heartbeat(self.ctx, spec, self.stream_fd)
        self.heartbeat.start()

    def recv(self) -> dict:
        return decode(self.sock.recv(), MAX_WORKER_FRAME_BYTES)

    def send(self, kind: W, **keys: object) -> None:
        self.sock.send(encode(wmsg(kind, **keys)))

    def stream(self, outs: list[Emitted | Vectors]) -> None:
        """What a step produced (TOKEN, END or ERROR frames), on the stream in order, in one write:
        one wake-up of the supervisor per step, however many requests it moved."""
        data = b"".join(frame(self.message(out)) for out in outs)
        try:
            write_all(self.stream_fd, data)
        except BrokenPipeError:  # the supervisor closed its end: it is gone, and so are the requests
            print(f"--- worker {self.spec.wid}: the supervisor closed the stream; exiting", flush=True)
            os._exit(EXIT_ORPHANED)
        first = False
        for out in outs:
            if out.chunk is not None and self.first_sent.get(out.rid) is False:
                self.first_sent[out.rid] = first = True
            if out.final:
                self.first_sent.pop(out.rid, None)
        if first:
            # Let the supervisor relay a first token now. With the model's threads on every
            # core, the pipe's wake-up queues the supervisor behind this thread, and the kernel
            # did not preempt for it: it ran at the next scheduler tick, up to 4 ms later at
            # 250 Hz (`perf sched timehist` on the 2-core CI machine). Not after every token: a
            # supervisor handed each token at once cannot merge tokens, and relayed 40% of the
            # fake backend's tokens/s that it does without.
            os.sched_yield()

    @staticmethod
    def message(out: Emitted | Vectors) -> dict:
        rid = out.rid
        if isinstance(out, Vectors):
            return wmsg(W.VECTORS, **{RID: rid, START: out.start, Key.EMBEDDINGS: out.vectors, Key.TOKENS: out.tokens})
        if out.error is not None:
            return wmsg(W.ERROR, **{RID: rid, Key.CODE: out.error[0].value, Key.MESSAGE: out.error[1]})
        if out.reason is not None:
            return wmsg(W.END, **{RID: rid, Key.REASON: out.reason.value, Key.PROMPT_TOKENS: out.prompt_tokens,
                                  Key.COMPLETION_TOKENS: out.completion_tokens})
        assert out.chunk is not None
        msg = wmsg(W.TOKEN, **{RID: rid, Key.TEXT: out.chunk.text, Key.N: out.chunk.n})
        if out.chunk.logprobs is not None:
            msg[Key.LOGPROBS] = out.chunk.logprobs
        return msg

    def run(self) -> int:
        started = time.monotonic()
        try:
            # Importing a backend's native libraries (CUDA ones can take seconds) holds the GIL,
            # so the heartbeat thread cannot beat: do it within the supervisor's start-up grace,
            # before hello starts the liveness clock.
            backend = create_backend(self.spec.model)
            # What the process costs before its model: the supervisor's estimates use it.
            self.send(W.HELLO, **{PID: os.getpid(), RSS: psutil.Process().memory_info().rss})
            backend.load()
            engine = backend.engine(self.spec.model.parallel, self.advance)
            self.embedder = backend.embedder() if self.spec.model.embedding else None
        except BaseException as exc:  # report anything, even SystemExit from a C extension wrapper
            traceback.print_exc()
            self.send(W.LOAD_FAILED, **{Key.MESSAGE: f"{type(exc).__name__}: {exc}"})
            self.close()
            return EXIT_LOAD_FAILED
        self.send(W.READY, **{LOAD_MS: round((time.monotonic() - started) * 1000, 1)})
        self.serve(engine)
        self.close()
        return EXIT_OK

    def serve(self, engine: Engine) -> None:
        """Take requests and cancels as they come; step the engine, and the embedder, while they
        run anything (an embed batch between two generation steps)."""
        embedder = self.embedder
        while True:
            if not engine.running and not (embedder and embedder.running):
                if self.exit_requested:
                    return
                if not self.sock.poll(_IDLE_POLL_MS):
                    if os.getppid() != _FIRST_PARENT:  # reparented: who forked us is gone
                        return
                    continue
            self.read_messages(engine)
            reaped = engine.reap()  # cancelled meanwhile: their slots free now, not after the next step
            if reaped:
                self.stream(reaped)
            for runner in (engine, embedder):
                if runner is not None and runner.running:
                    outs = runner.step()
                    if outs:  # progress: only what a step produced (a batched prompt reports its own)
                        self.advance()
                        self.stream(outs)

    def read_messages(self, engine: Engine) -> None:
        """What the supervisor sent meanwhile. Asking the socket is cheaper than a poll, and this
        runs between every two steps."""
        while self.sock.get(zmq.EVENTS) & zmq.POLLIN:
            msg = self.recv()
            kind = msg[T]
            if kind == W.GENERATE.value:
                self.admit(engine, msg[RID], msg[REQUEST], msg.get(RESUME, ""))
            elif kind == W.EMBED.value:
                self.admit_embed(msg[RID], msg[REQUEST])
            elif kind == W.CANCEL.value:
                engine.cancel(msg[RID])  # one that already ended needs nothing
                if self.embedder is not None:
                    self.embedder.cancel(msg[RID])
            elif kind == W.EXIT.value:
                # Finish nothing further: what runs ends as cancelled at the next step.
                self.exit_requested = True
                for rid in list(self.first_sent):
                    engine.cancel(rid)
                if self.embedder is not None:
                    self.embedder.cancel_all()

    def admit(self, engine: Engine, rid: int, req: dict, resume: str) -> None:
        """Start a request at the next step. `resume` is the completion a dead worker already
        streamed; max_tokens is what is left of it."""
        if self.exit_requested:
            self.stream([ended(rid, Reason.CANCELLED, 0, 0)])
            return
        request = GenerationRequest(
            prompt=req.get(Key.PROMPT),
            messages=req.get(Key.MESSAGES),
            max_tokens=req[Key.MAX_TOKENS],
            sampling=req,
            resume=resume,
            progress=self.advance,
        )
        try:
            engine.admit(rid, request)
        except Exception as exc:  # refused (a prompt too long for the context, say): kept nothing
            self.stream([failed(rid, exc)])
            return
        self.first_sent[rid] = False

    def admit_embed(self, rid: int, req: dict) -> None:
        """Start an embed job at the next step, or refuse it (an input too long, say)."""
        if self.exit_requested:
            self.stream([ended(rid, Reason.CANCELLED, 0, 0)])
            return
        try:
            if self.embedder is None:
                raise BadRequest(f"model '{self.spec.model.name}' does not serve embeddings")
            self.embedder.admit(rid, list(req[Key.INPUT]), bool(req[Key.NORMALIZE]), bool(req[Key.TRUNCATE]))
        except Exception as exc:
            self.stream([failed(rid, exc)])

    def advance(self) -> None:
        """Work moved on (a step, a batch of a prompt): beats now say so."""
        self.heartbeat.progress += 1

    def close(self) -> None:
        self.heartbeat.stopping.set()
        self.heartbeat.join(timeout=2.0)
        self.sock.close()
        self.ctx.term()
