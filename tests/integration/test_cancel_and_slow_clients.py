"""Cancel, slow readers (ROUTER_MANDATORY: coalesce, never drop), and vanished clients."""

import os
import signal
import subprocess
import sys
import time

import pytest

from stoker.workers.fake_backend import complete

from ..conftest import FAKE_MODELS, wait_for
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


_CLIENT = """
import sys, msgpack, zmq
sock = zmq.Context().socket(zmq.DEALER)
sock.setsockopt(zmq.RCVHWM, 1)
sock.setsockopt(zmq.RCVBUF, 4096)
sock.connect(sys.argv[1])
for rid in ("running", "queued"):
    sock.send(msgpack.packb({"v": 1, "op": "generate", "id": rid, "prompt": "p", "model": sys.argv[2],
                             "max_tokens": 8000}))
if sys.argv[3] == "read":
    while True:
        sock.recv()
print("sent", flush=True)
input()  # a stalled client: reads nothing; its pipe fills up
"""

_MODELS = FAKE_MODELS + """
[models.torrent]
backend = "fake"
end_every = 0
tokens_per_second = 2000
"""


@pytest.mark.parametrize("reader", ["read", "stall"])
def test_a_client_killed_mid_stream_frees_its_worker_within_a_second(start_supervisor, reader):
    # "stall": a client whose pipe is full, the case where a failed send proves nothing (libzmq
    # #2348); the socket monitor sees the disconnect anyway.
    sup = start_supervisor(models=_MODELS)
    model = "endless" if reader == "read" else "torrent"
    client = subprocess.Popen([sys.executable, "-c", _CLIENT, sup.endpoint, model, reader],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        wait_for(lambda: sup.workers(model, "busy") and sup.status()["queues"].get(model) == 1, 20,
                 "one request running and one queued")
        time.sleep(0.5)  # streaming (and for "stall", its pipe full)
        client.kill()
        client.wait()
        killed = time.monotonic()
        wait_for(lambda: sup.workers(model, "idle"), 5, "the worker to be free")
        freed = time.monotonic() - killed
        print(f"client killed ({reader}): worker free after {freed * 1000:.0f} ms")
        assert freed < 1.0, freed
        # The queued request never runs: the worker served only the cancelled one, and stays idle.
        time.sleep(0.5)
        [w] = sup.workers(model)
        assert (w["state"], w["served"]) == ("idle", 1)
        assert sup.status()["queues"] == {}
        assert "disconnected; cancelling its requests" in sup.log()
    finally:
        client.kill()
        client.wait()


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


def test_a_request_cancelled_before_its_worker_died_ends_at_once_without_a_reload(start_supervisor):
    models = '[models.heavy]\nbackend = "fake"\nload_seconds = 4\ntokens_per_second = 20\nend_every = 0\n'
    sup = start_supervisor(models=models, default_model="heavy")
    sock = raw_socket(sup.endpoint)
    send(sock, op="generate", id="g", prompt="p", max_tokens=500)
    recv_until(sock, ev="token")
    [w] = sup.workers()
    os.kill(w["pid"], signal.SIGSTOP)  # it cannot read the cancel...
    send(sock, op="cancel", id="c", target="g")
    recv_until(sock, id="c")
    os.kill(w["pid"], signal.SIGKILL)  # ...and dies without answering it
    killed = time.monotonic()
    end = recv_until(sock, id="g", ev="end")
    assert end["reason"] == "cancelled" and time.monotonic() - killed < 2.0  # not after a 4 s reload
    assert end["usage"]["completion_tokens"] >= 1
    sock.close()
