"""Promises of the README and the protocol that no other test checked: each test here fails when
its behaviour is broken (how each was checked is in docs/testing.md)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time

from stoker.protocol.client import Client
from stoker.protocol.messages import Op
from stoker.workers.fake_backend import complete as fake_complete

from ..conftest import wait_for
from .helpers import collect, raw_socket, recv_until, send
from .test_batch import CLI, lines, write_input

PLAIN = '[models.f]\nbackend = "fake"\nend_every = 0\n'


def test_stop_strings_end_the_text_through_the_supervisor(start_supervisor):
    sup = start_supervisor(PLAIN, default_model="f")
    full = "".join(fake_complete("stop here", 0, 40, end_every=0)[0])
    stop = full[len(full) // 2: len(full) // 2 + 3]
    with sup.client() as c:
        got = c.complete("stop here", max_tokens=40, seed=0, stop=[stop])
        assert c.complete("stop here", max_tokens=40, seed=0).text == full
    assert got.reason == "stop"
    assert got.text == full[: full.find(stop)]


def test_two_clients_may_use_the_same_ids(start_supervisor):
    sup = start_supervisor(PLAIN, default_model="f")
    a, b = raw_socket(sup.endpoint), raw_socket(sup.endpoint)
    try:
        send(a, op="generate", id=1, prompt="from a", max_tokens=5)
        send(b, op="generate", id=1, prompt="from b", max_tokens=5)
        got_a, got_b = collect(a, {1}), collect(b, {1})
        text = lambda got: "".join(r["text"] for r in got[1] if r["ev"] == "token")  # noqa: E731
        assert text(got_a) == "".join(fake_complete("from a", 0, 5, end_every=0)[0])
        assert text(got_b) == "".join(fake_complete("from b", 0, 5, end_every=0)[0])
        assert got_a[1][-1]["reason"] == got_b[1][-1]["reason"] == "length"
    finally:
        a.close()
        b.close()


def test_a_client_cannot_cancel_another_clients_request(start_supervisor):
    sup = start_supervisor(PLAIN.replace("end_every = 0", "end_every = 0\ntokens_per_second = 50"),
                           default_model="f")
    owner, other = raw_socket(sup.endpoint), raw_socket(sup.endpoint)
    try:
        send(owner, op="generate", id="mine", prompt="p", max_tokens=20)
        recv_until(owner, ev="token")
        send(other, op="cancel", id="c", target="mine")
        assert collect(other, {"c"})["c"][-1]["data"] == {"cancelled": False}
        end = collect(owner, {"mine"})["mine"][-1]
        assert end["ev"] == "end" and end["reason"] == "length" and end["usage"]["completion_tokens"] == 20
    finally:
        owner.close()
        other.close()


def test_socket_mode_sets_the_socket_files_permissions(start_supervisor, short_dir):
    sup = start_supervisor(PLAIN, socket_mode=0o660)
    mode = stat.S_IMODE(os.stat(short_dir / "s.sock").st_mode)
    assert mode == 0o660, oct(mode)
    with sup.client() as c:
        assert c.ping()["pong"]


def test_sighup_shuts_the_supervisor_down_cleanly(start_supervisor):
    sup = start_supervisor(PLAIN)
    with sup.client() as c:
        c.load("f")
    [pid] = [w["pid"] for w in sup.workers()]
    sup.proc.send_signal(signal.SIGHUP)
    assert sup.proc.wait(30) == 0
    assert "received SIGHUP; shutting down" in sup.log()
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z",
             10, "its worker to exit")


def test_a_worker_deaf_to_sigterm_is_killed_after_stop_grace(start_supervisor):
    """Stopping a loading worker sends SIGTERM (it reads no messages); one that ignores it gets
    SIGKILL stop_grace later, and the unload that asked for it is answered then."""
    sup = start_supervisor('[models.deaf]\nbackend = "fake"\nload_seconds = 60\nignore_sigterm = true\n',
                           stop_grace=1.5)
    with Client(sup.endpoint, timeout=30) as c:
        c.send(Op.LOAD, model="deaf")
        wait_for(lambda: [w["state"] for w in sup.workers()] == ["loading"], 20, "the load to begin")
        [deaf] = [w["pid"] for w in sup.workers()]
        time.sleep(0.5)  # past its SIGTERM handler's installation
        started = time.monotonic()
        assert c.unload("deaf")["unloaded"]
        took = time.monotonic() - started
    assert 1.4 <= took < 6, took
    assert "ignored SIGTERM; killed it" in sup.log()
    assert deaf not in [w["pid"] for w in sup.workers()]  # (the load still waiting starts a new one)


def test_batch_waits_out_a_full_queue_and_every_item_completes(start_supervisor, short_dir):
    sup = start_supervisor(PLAIN.replace("end_every = 0", "end_every = 0\ntokens_per_second = 200"), max_queue=1)
    inp, out = short_dir / "in.jsonl", short_dir / "out.jsonl"
    write_input(inp, 30, "q")
    job = subprocess.run(CLI + ["batch", str(inp), "-o", str(out), "-m", "f", "--concurrency", "8", "--config",
                                str(sup.config_path)], capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stderr
    got = lines(out)
    assert sorted(r["id"] for r in got) == sorted(f"q-{i}" for i in range(30))
    assert all("text" in r for r in got), [r for r in got if "text" not in r]
    assert "overloaded" in sup.log()  # the queue really was full along the way


def test_batch_interrupted_exits_130_with_whole_lines_and_the_rerun_finishes(start_supervisor, short_dir):
    sup = start_supervisor(PLAIN.replace("end_every = 0", "end_every = 0\ntokens_per_second = 100"))
    inp, out = short_dir / "in.jsonl", short_dir / "out.jsonl"
    write_input(inp, 40, "i")
    job = subprocess.Popen(CLI + ["batch", str(inp), "-o", str(out), "-m", "f", "--concurrency", "2", "--config",
                                  str(sup.config_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(lines(out)) >= 3, 60, "the batch to be under way")
    job.send_signal(signal.SIGINT)
    assert job.wait(30) == 130, job.communicate()
    _, err = job.communicate()
    assert "interrupted; run the same command again" in err
    text = out.read_text()
    assert text.endswith("\n") and all("text" in r for r in lines(out))
    rerun = subprocess.run(CLI + ["batch", str(inp), "-o", str(out), "-m", "f", "--config", str(sup.config_path)],
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(r["id"] for r in lines(out)) == sorted(f"i-{i}" for i in range(40))


def test_a_send_to_a_client_that_left_is_found_gone(tmp_path):
    """The EHOSTUNREACH path (ROUTER_MANDATORY): a reply to a client whose connection closed
    reports it gone, so its requests can be cancelled, even before the monitor's event is read."""
    import zmq

    from stoker.protocol.codec import encode
    from stoker.protocol.messages import Op as _Op
    from stoker.protocol.messages import request
    from stoker.supervisor.frontend import Delivery, Frontend, OutboxLimit

    ctx = zmq.Context()
    endpoint = f"ipc://{tmp_path}/f.sock"
    front = Frontend(ctx, endpoint, 1 << 20, 0o600, OutboxLimit(1 << 24, 100_000), None, 0, 1)
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(endpoint)
        dealer.send(encode(request(_Op.PING, 1)))
        frames = None
        deadline = time.monotonic() + 5
        while frames is None and time.monotonic() < deadline:
            front.socket.poll(100)
            frames = front.recv()
        assert frames is not None
        client = frames[0]
        assert front.send(client, {"v": 1, "id": 1, "ev": "result", "data": {}}) is Delivery.SENT
        dealer.close(linger=0)
        deadline = time.monotonic() + 5
        result = Delivery.SENT
        while result is not Delivery.GONE and time.monotonic() < deadline:
            time.sleep(0.05)
            result = front.send(client, {"v": 1, "id": 2, "ev": "result", "data": {}})
        assert result is Delivery.GONE
    finally:
        front.close()
        ctx.term()
