"""A busy model queues requests (bounded by max_queue) and serves them in order."""

import psutil

from .helpers import collect, raw_socket, recv, recv_until, send, text_of


def test_requests_queue_behind_a_busy_worker_and_overflow_is_overloaded(start_supervisor):
    sup = start_supervisor(max_queue=2)
    sock = raw_socket(sup.endpoint)
    send(sock, op="generate", id="run", prompt="p", model="slow", max_tokens=10)
    # Wait until it runs, so the next ones queue behind it.
    assert recv(sock)["state"] == "loading"
    assert recv(sock)["state"] == "running"
    send(sock, op="generate", id="q1", prompt="p1", model="slow", max_tokens=2)
    send(sock, op="generate", id="q2", prompt="p2", model="slow", max_tokens=2)
    send(sock, op="generate", id="q3", prompt="p3", model="slow", max_tokens=2)
    got = collect(sock, {"run", "q1", "q2", "q3"})
    assert got["q3"] == [{"v": 1, "id": "q3", "ev": "error", "code": "overloaded",
                          "message": got["q3"][0]["message"]}]
    assert "max_queue" in got["q3"][0]["message"]
    # (every info also names the supervisor's instance and the client's session with it)
    assert got["q1"][0].items() >= {"v": 1, "id": "q1", "ev": "info", "state": "queued", "position": 0}.items()
    assert got["q2"][0]["position"] == 1
    for rid in ("run", "q1", "q2"):
        assert got[rid][-1]["ev"] == "end"
    assert sup.status()["queues"] == {}
    # The one worker served them all, one after another.
    [w] = sup.workers()
    assert w["served"] == 3
    sock.close()


def test_duplicate_id_in_flight_is_rejected_and_the_first_is_unharmed(start_supervisor):
    sup = start_supervisor()
    sock = raw_socket(sup.endpoint)
    send(sock, op="generate", id=1, prompt="p", model="slow", max_tokens=4)
    send(sock, op="generate", id=1, prompt="other", model="slow", max_tokens=4)
    replies = []
    while not any(r["ev"] == "end" for r in replies):
        replies.append(recv(sock))
    errors = [r for r in replies if r["ev"] == "error"]
    # The duplicate's error carries id null: with id 1 it would read as the first one's terminal reply.
    assert len(errors) == 1 and errors[0]["id"] is None
    assert errors[0]["code"] == "bad_request" and "already in use" in errors[0]["message"]
    first = [r for r in replies if r["id"] == 1]
    assert text_of(first) != "" and [r["ev"] for r in first].count("end") == 1
    sock.close()


def test_a_worker_is_a_separate_process_per_model(start_supervisor):
    sup = start_supervisor()
    with sup.client() as c:
        c.complete("a", model="echo", max_tokens=1).text
        c.complete("a", model="slow", max_tokens=1).text
    pids = {w["pid"] for w in sup.workers()}
    assert len(pids) == 2
    assert pids <= {p.pid for p in psutil.Process(sup.proc.pid).children(recursive=True)}  # via its forkserver


def test_an_id_in_flight_cannot_be_reused_by_any_other_op(start_supervisor):
    sup = start_supervisor()
    sock = raw_socket(sup.endpoint)
    send(sock, op="generate", id="g", prompt="p", model="endless", max_tokens=20)
    recv_until(sock, ev="token")
    for op in ("ping", "status", "models", "shutdown"):
        send(sock, op=op, id="g")
    send(sock, op="cancel", id="g", target="g")
    replies = []
    while not replies or replies[-1].get("ev") != "end":
        replies.append(recv(sock))
    errors = [r for r in replies if r["ev"] == "error"]
    assert len(errors) == 5 and all(e["id"] is None and "already in use" in e["message"] for e in errors)
    assert [r["ev"] for r in replies if r["id"] == "g"].count("end") == 1
    assert not [r for r in replies if r["ev"] == "result"]
    with sup.client() as c:  # the shutdown was refused too
        assert c.ping()["pong"]
    sock.close()
