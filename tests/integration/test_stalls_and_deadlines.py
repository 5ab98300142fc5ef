"""A worker stuck inside a native call (its heartbeat thread still beats) is found by its lack of
progress and replaced, its request resumed; a request's own deadline ends it with `timeout`;
workers die at once with a supervisor killed in the middle of a load."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

from stoker.protocol.client import Client, Token
from stoker.protocol.errors import Timeout
from stoker.protocol.messages import Op
from stoker.workers.fake_backend import complete as fake_complete
from tests.conftest import wait_for

CLI = [sys.executable, "-m", "stoker.supervisor"]
STALLING = '[models.stuck]\nbackend = "fake"\ntokens_per_second = 100\nend_every = 0\nstall_after = 5\n'
ENDLESS = '[models.endless]\nbackend = "fake"\ntokens_per_second = 20\nend_every = 0\n'


def test_a_worker_that_beats_but_makes_no_progress_is_replaced_and_its_request_resumed(start_supervisor):
    sup = start_supervisor(STALLING, default_model="stuck", stall_timeout=2, worker_liveness=1)
    with Client(sup.endpoint, timeout=30) as c:
        t0 = time.monotonic()
        events = list(c.stream("hang on", max_tokens=8))
        took = time.monotonic() - t0
    tokens = [e for e in events if isinstance(e, Token)]
    assert "".join(t.text for t in tokens) == "".join(fake_complete("hang on", 0, 8, 0)[0])
    assert [t.seq for t in tokens] == sorted({t.seq for t in tokens})  # contiguous, nothing repeated
    assert events[-1].usage["completion_tokens"] == 8
    assert 2 <= took < 10, took
    log = sup.log()
    assert "made no progress on its request" in log and "stall_timeout" in log
    assert "sent nothing for" not in log  # its heartbeats went on: the stall, not the liveness, caught it


def test_a_request_past_its_deadline_ends_with_timeout_running_or_queued(start_supervisor):
    sup = start_supervisor(ENDLESS, default_model="endless")
    with Client(sup.endpoint, timeout=30) as c:
        running = c.generate("long", max_tokens=10_000, deadline=1.0)
        queued = c.generate("behind it", max_tokens=10_000, deadline=0.5)
        t0 = time.monotonic()
        with pytest.raises(Timeout) as err:
            list(queued)
        assert time.monotonic() - t0 < 1.5 and "deadline" in err.value.message
        with pytest.raises(Timeout):
            list(running)
        assert time.monotonic() - t0 < 2.5
        wait_for(lambda: [w["state"] for w in sup.workers()] == ["idle"], 3, "the worker to be free")
        assert c.complete("after", max_tokens=3).text == "".join(fake_complete("after", 0, 3, 0)[0])
    run = subprocess.run(CLI + ["run", "x", "-n", "5000", "--deadline", "0.5", "--no-start", "--config",
                                str(sup.config_path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 4 and "deadline" in run.stderr


def test_workers_die_at_once_with_a_supervisor_killed_during_a_load(start_supervisor):
    sup = start_supervisor('[models.slowload]\nbackend = "fake"\nload_seconds = 30\n', default_model="slowload")
    with Client(sup.endpoint, timeout=30) as c:
        c.send(Op.LOAD, model="slowload")  # not waited for: its answer would come in 30 s
        wait_for(lambda: [w["state"] for w in sup.workers()] == ["loading"], 10, "the load to begin")
    pids = sup.worker_pids()
    assert pids
    sup.proc.send_signal(signal.SIGKILL)
    sup.proc.wait(10)
    t0 = time.monotonic()

    def all_gone() -> bool:
        return all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in pids)

    wait_for(all_gone, 5, "the workers to exit")
    assert time.monotonic() - t0 < 1.0
