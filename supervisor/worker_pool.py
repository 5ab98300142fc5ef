"""The worker processes and the sockets and pipes that reach them: start, stop, send, read,
beat, reap. I/O only; what to do about what they say is the event loop's (server.py)."""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import zmq
from loguru import logger

from stoker.protocol.codec import decode, encode
from stoker.protocol.messages import Message
from stoker.workers.wire import HEARTBEAT_SUFFIX, MAX_WORKER_FRAME_BYTES, PROGRESS, W, wmsg
from stoker.supervisor.config import ModelConfig
from stoker.supervisor.memory import Cost
from stoker.supervisor.resources import GpuMemoryWatch, rss_bytes
from stoker.supervisor.scheduler import Scheduler
from stoker.supervisor.states import WorkerState
from stoker.supervisor.worker_process import WorkerProcess

RECV_BATCH = 200  # frames read from one socket before looking at the others


class WorkerPool:
    def __init__(self, ctx: zmq.Context, private_dir: Path, log_dir: Path, liveness_s: float,
                 poller: zmq.Poller) -> None:
        self.endpoint = f"ipc://{private_dir / 'workers.sock'}"
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(self.endpoint)
        self.log_dir = log_dir
        self.liveness_s = liveness_s
        self.poller = poller
        poller.register(self.socket, zmq.POLLIN)
        self.procs: dict[str, WorkerProcess] = {}
        self.sentinels: dict[int, WorkerProcess] = {}  # each live worker's sentinel fd
        self.streams: dict[int, WorkerProcess] = {}  # each live worker's generation stream (read end)

    def __len__(self) -> int:
        return len(self.procs)

    def start(self, wid: str, model: ModelConfig, n_threads: int, now: float) -> WorkerProcess:
        proc = WorkerProcess.start(wid, replace(model, n_threads=n_threads), self.endpoint, self.log_dir,
                                   self.liveness_s, now)
        try:
            self.poller.register(proc.sentinel, zmq.POLLIN)
            self.sentinels[proc.sentinel] = proc
            self.poller.register(proc.stream.fd, zmq.POLLIN)
            self.streams[proc.stream.fd] = proc
        except BaseException:
            # Not watched, it could never be reaped or stopped: it must not outlive this failure
            # (the caller tells the scheduler the worker is gone).
            for fd, table in ((proc.sentinel, self.sentinels), (proc.stream.fd, self.streams)):
                if table.pop(fd, None) is not None:
                    self.poller.unregister(fd)
            proc.signal(signal.SIGKILL)
            proc.reap()
            raise
        self.procs[wid] = proc  # only a worker whose exit will be seen
        return proc

    def stop(self, wid: str, now: float, grace: float, force: bool) -> None:
        """Ask it to exit (force: SIGTERM, for a loading worker that reads no messages); SIGKILL
        after the grace."""
        proc = self.procs.get(wid)
        if proc is None:
            return
        if not force:
            self.send(wid, W.EXIT)
        proc.stop(now, grace, force)

    def send(self, wid: str, kind: W, **keys: Any) -> bool:
        try:
            self.socket.send_multipart([wid.encode(), encode(wmsg(kind, **keys))], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:  # not connected, gone, or not reading: its sentinel tells the rest
            logger.warning("could not send {} to worker {}: {}", kind.value, wid, exc)
            return False

    def beat(self) -> None:
        frame = encode(wmsg(W.HEARTBEAT))
        for wid in self.procs:
            try:
                self.socket.send_multipart([(wid + HEARTBEAT_SUFFIX).encode(), frame], zmq.NOBLOCK)
            except zmq.ZMQError:  # not connected yet, or gone: its own silence decides
                pass

    def read_socket(self, now: float) -> tuple[list[tuple[WorkerProcess, Message]], bool]:
        """Up to a batch of messages from the socket (hello, ready, load failures; heartbeats are
        taken in here), and whether none are left waiting. Tokens come on the streams instead."""
        out: list[tuple[WorkerProcess, Message]] = []
        for _ in range(RECV_BATCH):
            try:
                # Asking first is cheaper than the exception an empty socket raises.
                if not self.socket.get(zmq.EVENTS) & zmq.POLLIN:
                    return out, True
                wid_b, frame = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return out, True
            wid = wid_b.decode(errors="replace")
            heartbeat = wid.endswith(HEARTBEAT_SUFFIX)
            proc = self.procs.get(wid[: -len(HEARTBEAT_SUFFIX)] if heartbeat else wid)
            if proc is None:
                continue  # a worker already reaped: what it sent last no longer matters
            proc.heard(now)
            try:
                msg = decode(frame, MAX_WORKER_FRAME_BYTES)
            except Exception:
                logger.exception("bad message from worker {}", proc.wid)
                continue
            if heartbeat:
                proc.heard(now, msg.get(PROGRESS))
            else:
                out.append((proc, msg))
        return out, False

    def read_stream(self, proc: WorkerProcess, now: float) -> list[Message]:
        """All a worker's generation stream holds (a pipe holds at most its buffer, and the
        worker waits while it is full). A worker writing a broken stream is killed."""
        if proc.stream.fd not in self.streams:
            return []  # stopped reading it: ended, or broken
        frames = proc.stream.read()
        if proc.stream.eof or proc.stream.error:
            self._stop_reading(proc)  # an ended pipe reads as ready for ever; its sentinel tells the rest
        out = []
        if frames:
            proc.heard(now)
            if proc.progress_at is not None:
                proc.progress_at = now
            for frame in frames:
                try:
                    out.append(decode(frame, MAX_WORKER_FRAME_BYTES))
                except Exception:
                    logger.exception("bad message from worker {}", proc.wid)
        if proc.stream.error:
            logger.error("worker {} (pid {}) wrote a broken stream ({}); killing it", proc.wid, proc.pid,
                         proc.stream.error)
            proc.signal(signal.SIGKILL)  # its sentinel brings the usual crash handling
        return out

    def exited(self, ready: dict[Any, int]) -> list[WorkerProcess]:
        return [self.sentinels[fd] for fd in ready if fd in self.sentinels]

    def ready_streams(self, ready: dict[Any, int]) -> list[WorkerProcess]:
        return [self.streams[fd] for fd in ready if fd in self.streams]

    def reap(self, proc: WorkerProcess) -> str:
        """Forget an exited worker; how it ended and its last log lines."""
        self.poller.unregister(proc.sentinel)
        self.sentinels.pop(proc.sentinel, None)
        if proc.stream.partial:
            logger.warning("worker {} died in the middle of a stream frame ({} bytes of it)", proc.wid,
                           proc.stream.partial)
        self._stop_reading(proc)
        del self.procs[proc.wid]
        return proc.reap()

    def escalate(self, now: float, grace: float) -> None:
        for proc in self.procs.values():
            if proc.escalate(now, grace):
                logger.warning("worker {} (pid {}) ignored SIGTERM; killed it", proc.wid, proc.pid)

    def terminate_all(self, now: float, grace: float) -> None:
        for proc in self.procs.values():
            if proc.kill_at is None:
                proc.stop(now, grace, force=True)

    def deadlines(self) -> Iterator[float | None]:
        for p in self.procs.values():
            yield p.term_at
            yield p.kill_at

    def measured(self, sched: Scheduler, watch: GpuMemoryWatch) -> list[tuple[str, Cost]]:
        """What loaded workers really hold."""
        out = []
        for wid, proc in self.procs.items():
            slot = sched.workers.get(wid)
            if slot is not None and slot.state in (WorkerState.IDLE, WorkerState.BUSY):
                # NVML may not list a process (or not know its usage), and what it read before
                # the model was loaded is not what the worker holds: keep the GPU estimate then.
                fresh = proc.ready_at is not None and watch.taken_at > proc.ready_at
                vram = watch.snapshot.get(proc.pid, 0) if fresh else 0
                cost = Cost(rss_bytes(proc.pid), vram or slot.charge.vram)
                if cost.ram:  # 0: it exited a moment ago
                    out.append((wid, cost))
        return out

    def close(self) -> None:
        self.socket.close()

    def _stop_reading(self, proc: WorkerProcess) -> None:
        if self.streams.pop(proc.stream.fd, None) is not None:
            self.poller.unregister(proc.stream.fd)
