"""Cancel, slow readers (ROUTER_MANDATORY: coalesce, never drop), and vanished clients."""

import os
import signal
import time

from stoker.supervisor.frontend import CLIENT_GONE_S
from stoker.workers.fake_backend import complete

from ..conftest import wait_for
from .helpers import collect, raw_socket, recv, recv_until, send, text_of


def test_cancel_a_running_request(start_supervisor):
    sup = start_supervisor()
    sock = raw_socket(sup.endpoint)
    send(sock, op="generate", id="g", prompt="p", model="endless", max_tokens=500)
    recv_until(sock, ev="token")
    send(sock, op="cancel", id="c", target="g")
    got = collect(sock, {"g", "c"})
    assert got["c"][-1]["data"] == {"cancelled": True}
    end = got["g"][-1]
    assert end["ev"] == "end" and end["reason"] == "cancelled"
    assert end["usage"]["completion_tokens"] < 500
    wait_for(lambda: sup.workers("endless", "idle"), 10, "the worker to be free again")
    sock.close()


def test_cancel_a_queued_request_and_an_unknown_one(start_supervisor):
    sup = start_supervisor()
    sock = raw_socket(sup.endpoint)
    send(sock, op="generate", id="run", prompt="p", model="slow", max_tokens=20)
    send(sock, op="generate", id="wait", prompt="q", model="slow", max_tokens=20)
    wait_for(lambda: sup.status()["queues"].get("slow") == 1, 10, "the second request to queue")
    send(sock, op="cancel", id="c1", target="wait")
    send(sock, op="cancel", id="c2", target="never-sent")
    got = collect(sock, {"run", "wait", "c1", "c2"})
    assert got["c1"][-1]["data"] == {"cancelled": True}
    assert got["c2"][-1]["data"] == {"cancelled": False}
    assert [r["ev"] for r in got["wait"]][-1] == "end" and got["wait"][-1]["reason"] == "cancelled"
    assert not [r for r in got["wait"] if r["ev"] == "token"]
    assert got["run"][-1]["reason"] == "length"
    sock.close()


def test_a_client_that_does_not_read_loses_no_token(start_supervisor):
    """A batch client sends many requests and reads nothing for a while; the ROUTER's pipe to it
    fills. Nothing is dropped: the supervisor keeps the replies and sends waiting tokens merged
    (n > 1) once the client reads again."""
    sup = start_supervisor()
    prompts = {f"b{i}": f"flood {i}" for i in range(250)}  # ~25k token frames: far past SNDHWM
    sock = raw_socket(sup.endpoint, rcvhwm=10)
    for rid, prompt in prompts.items():
        send(sock, op="generate", id=rid, prompt=prompt, model="echo", max_tokens=400)
    wait_for(lambda: sup.workers("echo", "idle") and sup.workers("echo", "idle")[0]["served"] == len(prompts),
             120, "the model to finish everything while the client is not reading")
    got = collect(sock, set(prompts))
    frames = 0
    for rid, prompt in prompts.items():
        replies = got[rid]
        tokens = [r for r in replies if r["ev"] == "token"]
        assert text_of(replies) == "".join(complete(prompt, 0, 400)[0])
        assert replies[-1]["ev"] == "end"
        assert sum(t["n"] for t in tokens) == replies[-1]["usage"]["completion_tokens"]
        frames += len(tokens)
    total = sum(r[-1]["usage"]["completion_tokens"] for r in got.values())
    assert frames < total, "expected coalesced frames (n > 1) once the pipe was full"
    sock.close()


def test_a_vanished_client_frees_its_worker(start_supervisor):
    sup = start_supervisor()
    sock = raw_socket(sup.endpoint)
    send(sock, op="generate", id="g", prompt="p", model="endless", max_tokens=8000)  # 400 s
    recv_until(sock, ev="token")
    sock.close()  # gone without a word
    started = time.monotonic()
    with sup.client() as c:  # the worker is cancelled once replies find no one, and serves others
        assert c.generate("next", model="endless", max_tokens=2) == "".join(complete("next", 0, 2, 0)[0])
    # Its pipe was never full, so the first failed send is proof enough: no 5 s wait.
    assert time.monotonic() - started < CLIENT_GONE_S
    assert "disconnected; cancelling its requests" in sup.log()


def test_a_cancelled_request_stays_cancelled_when_its_worker_dies_before_the_first_token(start_supervisor):
    models = '[models.glacial]\nbackend = "fake"\ntokens_per_second = 0.25\n'  # first token after 4 s
    sup = start_supervisor(models=models, default_model="glacial")
    sock = raw_socket(sup.endpoint)
    send(sock, op="generate", id="g", prompt="p", max_tokens=50)
    recv_until(sock, state="running")
    send(sock, op="cancel", id="c", target="g")
    assert recv(sock)["data"] == {"cancelled": True}
    [w] = sup.workers()
    os.kill(w["pid"], signal.SIGKILL)  # before it read the cancel's effect: the job is re-run...
    got = collect(sock, {"g"})["g"]
    assert got[-1]["ev"] == "end" and got[-1]["reason"] == "cancelled"  # ...and cancelled again
    assert got[-1]["usage"]["completion_tokens"] <= 1
