"""SIGTERM, SIGINT and the shutdown op stop gracefully: every request answered, no worker left."""

import os
import signal
import time

import psutil
import pytest

from ..conftest import wait_for
from stoker.workers.fake_backend import complete

from .helpers import collect, raw_socket, recv, recv_until, send, text_of


@pytest.mark.parametrize("how", ["op", signal.SIGTERM, signal.SIGINT])
def test_graceful_shutdown_answers_everything_and_leaves_nothing(start_supervisor, how):
    sup = start_supervisor(drain_timeout=5)
    sock = raw_socket(sup.endpoint)
    with sup.client() as c:
        c.load("echo")
    send(sock, op="generate", id="run", prompt="p", model="slow", max_tokens=10)
    recv_until(sock, state="running")
    send(sock, op="generate", id="wait", prompt="q", model="slow", max_tokens=10)
    early = []  # run's tokens keep coming meanwhile
    while not early or early[-1]["id"] != "wait":
        early.append(recv(sock))
    assert early[-1].items() >= {"v": 1, "id": "wait", "ev": "info", "state": "queued", "position": 0}.items()
    workers = {w["pid"] for w in sup.workers()}
    assert len(workers) == 2
    if how == "op":
        send(sock, op="shutdown", id="stop")
        ids = {"run", "wait", "stop"}
    else:
        sup.proc.send_signal(how)
        ids = {"run", "wait"}
    got = collect(sock, ids)
    got["run"] = [r for r in early if r["id"] == "run"] + got["run"]
    assert text_of(got["run"]) == "".join(complete("p", 0, 10)[0])
    assert got["wait"][-1]["code"] == "shutting_down"
    assert got["run"][-1]["ev"] == "end" and got["run"][-1]["reason"] == "length"  # finished within the grace
    if how == "op":
        assert got["stop"][-1]["data"] == {"stopping": True}
    assert sup.proc.wait(30) == 0
    assert not sup.socket_path.exists()
    for pid in workers:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    sock.close()


def test_requests_during_shutdown_are_refused(start_supervisor):
    sup = start_supervisor(drain_timeout=5)
    sock = raw_socket(sup.endpoint)
    send(sock, op="generate", id="run", prompt="p", model="endless", max_tokens=40)
    recv_until(sock, ev="token")
    send(sock, op="shutdown", id="stop")
    send(sock, op="generate", id="late", prompt="p", model="echo")
    got = collect(sock, {"run", "stop", "late"})
    assert got["late"][-1]["code"] == "shutting_down"
    assert sup.proc.wait(30) == 0
    sock.close()


def test_running_requests_past_the_grace_get_shutting_down(start_supervisor):
    sup = start_supervisor(drain_timeout=0.5)
    sock = raw_socket(sup.endpoint)
    send(sock, op="generate", id="long", prompt="p", model="endless", max_tokens=8000)
    recv_until(sock, ev="token")
    sup.proc.send_signal(signal.SIGTERM)
    got = collect(sock, {"long"})
    assert got["long"][-1]["code"] == "shutting_down"
    assert sup.proc.wait(30) == 0


def test_supervisor_killed_with_sigkill_takes_its_workers_with_it(start_supervisor):
    sup = start_supervisor()
    with sup.client() as c:
        c.load("echo")
    [pid] = [w["pid"] for w in sup.workers()]
    sup.proc.kill()
    sup.proc.wait(10)
    t0 = time.monotonic()
    wait_for(lambda: gone(pid), 10, "the orphaned worker to die with its supervisor")
    assert time.monotonic() - t0 < 1.0  # at once (the README's word), not after a heartbeat window


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_frozen_worker_dies_with_its_supervisor_all_the_same(start_supervisor):
    """The worker's own checks (its heartbeat thread) cannot run in a stopped process: only the
    kernel's parent-death signal (PR_SET_PDEATHSIG, through the forkserver that exits with the
    supervisor) takes it down. Without it the worker would stay, stopped, holding its model."""
    sup = start_supervisor()
    with sup.client() as c:
        c.load("echo")
    [pid] = [w["pid"] for w in sup.workers()]
    forkserver = psutil.Process(pid).ppid()
    os.kill(pid, signal.SIGSTOP)
    try:
        sup.proc.kill()
        sup.proc.wait(10)
        t0 = time.monotonic()
        wait_for(lambda: gone(pid), 5, "the stopped worker to be killed by its parent's death")
        assert time.monotonic() - t0 < 1.0
        assert gone(forkserver)
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_second_supervisor_on_the_same_endpoint_refuses_to_start(start_supervisor):
    import subprocess
    import sys

    sup = start_supervisor()
    second = subprocess.run([sys.executable, "-m", "stoker.supervisor", "serve", "--config", str(sup.config_path)],
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 2 and "already running" in second.stderr
    with sup.client() as c:  # the first one is untouched
        assert c.ping()["pong"]


def test_shutdown_while_a_model_is_loading_answers_the_load(start_supervisor):
    models = '[models.heavy]\nbackend = "fake"\nload_seconds = 30\n'
    sup = start_supervisor(models=models, default_model="heavy")
    sock = raw_socket(sup.endpoint)
    send(sock, op="load", id="L", model="heavy")
    wait_for(lambda: sup.workers("heavy", "loading"), 20, "the load to start")
    send(sock, op="shutdown", id="S")
    got = collect(sock, {"L", "S"})
    assert got["L"][-1]["code"] == "shutting_down"
    assert sup.proc.wait(30) == 0


def test_workers_of_a_frozen_supervisor_exit_by_themselves_within_the_liveness_window(start_supervisor):
    sup = start_supervisor(worker_liveness=1.0)
    with sup.client() as c:
        c.load("echo")
    [pid] = [w["pid"] for w in sup.workers()]
    sup.proc.send_signal(signal.SIGSTOP)  # alive, but silent: no heartbeats reach the worker
    try:
        frozen = time.monotonic()
        wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                 10, "the worker to notice its supervisor is silent")
        assert time.monotonic() - frozen < 2.5
    finally:
        sup.proc.send_signal(signal.SIGCONT)
    # Woken up, the supervisor sees its worker gone and serves on.
    with sup.client() as c:
        assert c.complete("x", model="echo", max_tokens=2).text == "".join(complete("x", 0, 2)[0])
    assert "no heartbeat from the supervisor" in (sup.folder / "state" / "workers" / "worker-echo.log").read_text()
