"""WorkerPool: a worker it cannot watch is not left running."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import zmq

from stoker.supervisor.config import ModelConfig
from stoker.supervisor.worker_pool import WorkerPool
from stoker.supervisor.worker_process import WorkerProcess


class PollerThatFails(zmq.Poller):
    """Takes the pool's own socket, then refuses the first thing a worker needs watched."""

    def __init__(self) -> None:
        super().__init__()
        self.registered = 0

    def register(self, socket, flags=zmq.POLLIN | zmq.POLLOUT):
        self.registered += 1
        if self.registered == 3:  # the worker's stream, after its sentinel
            raise OSError("no more room in the poller")
        return super().register(socket, flags)


def test_a_worker_that_cannot_be_watched_is_killed_and_not_kept(tmp_path: Path, monkeypatch) -> None:
    started: list[WorkerProcess] = []
    real_start = WorkerProcess.start

    def start_and_note(*args, **kwargs) -> WorkerProcess:  # the real start; we keep its pid
        proc = real_start(*args, **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setattr(WorkerProcess, "start", start_and_note)
    ctx = zmq.Context()
    pool = WorkerPool(ctx, tmp_path, tmp_path / "logs", 5.0, PollerThatFails())
    try:
        with pytest.raises(OSError, match="no more room"):
            pool.start("w1", ModelConfig(name="echo", backend="fake"), 1, time.monotonic())
        assert len(pool) == 0 and pool.sentinels == {} and pool.streams == {}
        [proc] = started
        with pytest.raises(ProcessLookupError):
            os.kill(proc.pid, 0)  # killed and reaped
    finally:
        pool.socket.close()
        ctx.term()
