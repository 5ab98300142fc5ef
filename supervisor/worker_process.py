"""A worker OS process seen from the supervisor: start it, signal it, reap it, read its log."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from stoker.workers.stream import StreamReader
from stoker.workers.wire import MAX_WORKER_FRAME_BYTES
from stoker.supervisor.config import ModelConfig
from stoker.workers.main import WorkerSpec, run_worker

# Workers are forked by a forkserver: a clean process (no ZeroMQ context or sockets of the
# supervisor's, which a plain fork would inherit) that has imported the worker code, and
# llama_cpp, once. A new worker then costs a fork, not an interpreter start and its imports
# (about 0.5 s): cold starts come close to an in-process load.
_MP = multiprocessing.get_context("forkserver")
_PRELOAD = ["stoker.workers.main", "stoker.workers.fake_backend", "stoker.supervisor.config"]
_PRELOAD_LLAMA = ["llama_cpp", "stoker.workers.llama_backend"]


def start_forkserver(gpu: bool) -> None:
    """Start the forkserver now (it imports in the background) rather than at the first load.
    With GPU models llama_cpp is not preloaded: a CUDA runtime initialised before a fork is
    unusable in the child, so each GPU worker imports it itself."""
    _MP.set_forkserver_preload(_PRELOAD + ([] if gpu else _PRELOAD_LLAMA))
    from multiprocessing import forkserver

    forkserver.ensure_running()
LOG_TAIL_LINES = 12


def log_path_of(log_dir: Path, model: str) -> Path:
    """Where a model's workers write their stdout and stderr (llama.cpp's too), each process's
    lines under a header with its wid and pid."""
    return log_dir / f"worker-{re.sub(r'[^A-Za-z0-9_.-]', '_', model)}.log"


@dataclass
class WorkerProcess:
    wid: str
    model: str
    process: multiprocessing.process.BaseProcess
    pid: int
    log_path: Path
    log_offset: int  # where this process's lines start in the (shared, appended) log file
    stream: StreamReader  # its generation stream (tokens, ends, errors)
    term_at: float | None = None  # when to send SIGTERM if it has not exited
    kill_at: float | None = None  # when to send SIGKILL
    load_ms: float = 0.0
    last_heard: float = 0.0  # when it last sent anything (a heartbeat included)
    hello: bool = False  # it has said hello: its heartbeat thread runs
    hung_for: float | None = None  # set when it was killed for missing heartbeats this long
    stalled_for: float | None = None  # set when it was killed for a request without progress this long
    ready_at: float | None = None  # when its model was loaded
    # While it runs a request: when it last showed progress (a token, or its heartbeat's counter
    # moving); None when it runs none.
    progress_at: float | None = None
    progress: object = None  # the counter its last heartbeat carried
    exit_sent: bool = False  # asked to exit: its exit is no crash

    @property
    def sentinel(self) -> int:
        return self.process.sentinel

    @classmethod
    def start(cls, wid: str, model: ModelConfig, backend_endpoint: str, log_dir: Path, liveness: float,
              now: float) -> "WorkerProcess":
        log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_path = log_path_of(log_dir, model.name)
        offset = log_path.stat().st_size if log_path.exists() else 0
        read_fd, write_fd = os.pipe()
        # A Connection, so that the forkserver hands its fd to the child.
        writer = Connection(write_fd, readable=False)
        try:
            stream = StreamReader(read_fd, MAX_WORKER_FRAME_BYTES)
            spec = WorkerSpec(wid, model, backend_endpoint, str(log_path), os.getpid(), writer, liveness)
            proc = _MP.Process(target=run_worker, args=(spec,), name=f"stoker-worker-{model.name}", daemon=True)
            proc.start()
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            # Only the worker writes: once it exits, its stream reads as ended.
            writer.close()
        return cls(wid, model.name, proc, proc.pid, log_path, offset, stream, last_heard=now)

    def heard(self, now: float, progress: object = None) -> None:
        """It sent something; a heartbeat carries its progress counter (tokens, prompt batches):
        while that moves, a long generation or prompt is not a stall."""
        self.last_heard = now
        if progress is not None and progress != self.progress:
            self.progress = progress
            if self.progress_at is not None:
                self.progress_at = now

    def stop(self, now: float, grace: float, force: bool) -> None:
        """Ask it to exit: force (SIGTERM) when it reads no messages (loading); SIGKILL after the grace."""
        if force:
            self.signal(signal.SIGTERM)
            self.term_at, self.kill_at = None, now + grace
        else:
            self.exit_sent = True  # the caller sent it the exit message
            self.term_at = now + grace

    def escalate(self, now: float, grace: float) -> bool:
        """SIGTERM, then SIGKILL, once their times come; True when it had to be killed."""
        if self.term_at is not None and now >= self.term_at:
            self.stop(now, grace, force=True)
        elif self.kill_at is not None and now >= self.kill_at:
            self.signal(signal.SIGKILL)
            self.kill_at = None
            return True
        return False

    @property
    def asked_to_stop(self) -> bool:
        return self.term_at is not None or self.kill_at is not None or self.exit_sent

    def signal(self, sig: signal.Signals) -> None:
        if self.process.exitcode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def reap(self) -> str:
        """Collect the exited process; returns how it ended and its last log lines."""
        # The sentinel closes as the child exits, a moment before it can be waited for.
        self.process.join(timeout=5.0)
        if self.process.exitcode is None:  # closed its fds but will not finish exiting
            self.signal(signal.SIGKILL)
            self.process.join(timeout=5.0)
        code = self.process.exitcode
        if code is None:
            how = "still running"
        elif code < 0:
            how = f"killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with code {code}"
        if self.hung_for is not None:
            how = f"stopped answering (no heartbeat for {self.hung_for:.1f} s) and was {how}"
        elif self.stalled_for is not None:
            how = f"made no progress on its request for {self.stalled_for:.1f} s (stall_timeout) and was {how}"
        tail = self.log_tail()
        self.stream.close()
        if code is not None:
            self.process.close()
        return f"{how}; last log lines: {tail}" if tail else how

    def log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(self.log_offset, self.log_path.stat().st_size - 8192))
                data = f.read()
        except OSError:
            return ""
        lines = [ln for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
        lines = [ln for ln in lines if not ln.startswith("--- worker ")]
        return " | ".join(lines[-LOG_TAIL_LINES:])
