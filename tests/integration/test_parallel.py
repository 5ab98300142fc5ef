"""A worker with `parallel = 4` slots (fake backend): requests run at once, a slot freed by an end,
a cancel or a client gone is taken at once, a crash resumes every sequence, clients take turns."""

from __future__ import annotations

import os
import signal
import time

from stoker.workers.fake_backend import complete

from ..conftest import wait_for
from .helpers import raw_socket, recv, send, text_of

# 20 tokens/s alone; with 4 in a step each step takes 1.45 times as long (batch_cost 0.15).
PAR = """
[models.par]
backend = "fake"
parallel = 4
tokens_per_second = 20
end_every = 0
load_seconds = 0.3
"""


def read_all(socks_ids: dict, timeout: float = 60.0) -> dict:
    """Read every socket until each id has its terminal reply: id -> [(arrival time, reply)]."""
    got: dict = {rid: [] for ids in socks_ids.values() for rid in ids}
    open_ids = set(got)
    deadline = time.monotonic() + timeout
    while open_ids:
        assert time.monotonic() < deadline, f"still open: {open_ids}"
        for sock in socks_ids:
            while sock.poll(0):
                msg = recv(sock)
                got[msg["id"]].append((time.monotonic(), msg))
                if msg["ev"] in ("end", "error", "result"):
                    open_ids.discard(msg["id"])
        time.sleep(0.002)
    return got


def tokens_at(replies: list) -> list[float]:
    return [t for t, r in replies if r["ev"] == "token"]


def end_of(replies: list) -> tuple[float, dict]:
    return replies[-1]


def msgs(replies: list) -> list[dict]:
    return [r for _, r in replies]


def test_four_requests_run_at_once_and_a_fifth_takes_the_first_free_slot(start_supervisor):
    sup = start_supervisor(models=PAR, default_model="par")
    sock = raw_socket(sup.endpoint)
    lengths = {"a": 6, "b": 30, "c": 30, "d": 30, "e": 10}
    for rid, n in lengths.items():
        send(sock, op="generate", id=rid, prompt=f"prompt {rid}", max_tokens=n)
    busy = wait_for(lambda: [w for w in sup.workers("par") if w["running"] == 4], 20, "four requests running")
    assert busy[0]["slots"] == 4 and busy[0]["state"] == "busy"
    got = read_all({sock: list(lengths)})
    for rid, n in lengths.items():  # each its own text, whole and in order, whatever ran beside it
        assert text_of(msgs(got[rid])) == "".join(complete(f"prompt {rid}", 0, n, 0)[0])
        assert end_of(got[rid])[1]["reason"] == "length"
    firsts = {rid: tokens_at(got[rid])[0] for rid in "abcd"}
    lasts = {rid: tokens_at(got[rid])[-1] for rid in "abcd"}
    # The four overlap: each started before any of the others finished.
    assert max(firsts.values()) < min(lasts.values())
    # The fifth waited for a slot, and got a's as soon as a ended (a step is about 75 ms).
    e_first = tokens_at(got["e"])[0]
    a_end = end_of(got["a"])[0]
    assert e_first > a_end and e_first - a_end < 0.6, e_first - a_end
    assert e_first < min(lasts[rid] for rid in "bcd")
    assert [r["state"] for r in msgs(got["e"]) if r["ev"] == "info"][-1] == "running"
    assert len([w for w in sup.workers("par")]) == 1  # one worker served all five
    sock.close()


def test_cancel_and_a_client_gone_free_their_slot_at_once_and_the_others_stream_on(start_supervisor):
    sup = start_supervisor(models=PAR, default_model="par")
    a, b = raw_socket(sup.endpoint), raw_socket(sup.endpoint)
    for rid in ("a1", "a2"):
        send(a, op="generate", id=rid, prompt=rid, max_tokens=40)
    send(b, op="generate", id="b1", prompt="b1", max_tokens=400)
    send(a, op="generate", id="a3", prompt="a3", max_tokens=400)
    wait_for(lambda: [w for w in sup.workers("par") if w["running"] == 4], 20, "four requests running")
    send(a, op="generate", id="a4", prompt="a4", max_tokens=5)  # waits: every slot is taken
    send(a, op="generate", id="a5", prompt="a5", max_tokens=5)
    wait_for(lambda: sup.status()["queues"].get("par") == 2, 10, "a4 and a5 to wait for a slot")
    cancel_at = time.monotonic()
    send(a, op="cancel", id="c", target="a3")
    b.close()  # b1's client goes: its slot too
    got = read_all({a: ["a1", "a2", "a3", "a4", "a5", "c"]})
    assert end_of(got["a3"])[1]["reason"] == "cancelled"
    for rid in ("a4", "a5"):  # both waiting requests got a freed slot within a few steps
        first = tokens_at(got[rid])[0]
        assert first - cancel_at < 1.0, (rid, first - cancel_at)
        assert text_of(msgs(got[rid])) == "".join(complete(rid, 0, 5, 0)[0])
    for rid in ("a1", "a2"):  # unaffected: whole, in order, the same text
        assert text_of(msgs(got[rid])) == "".join(complete(rid, 0, 40, 0)[0])
    wait_for(lambda: [w for w in sup.workers("par") if w["running"] == 0], 10, "every slot free")
    a.close()


def test_a_cancelled_request_ends_within_the_step_running_when_it_came(start_supervisor):
    """Steps of 250 ms; a cancel sent just after a token (a step has just begun) is answered when
    that step ends, not after one more: its slot is free within one step."""
    step = 0.25
    sup = start_supervisor(models=PAR.replace("[models.par]", "[models.slowpar]").replace(
        "tokens_per_second = 20", f"tokens_per_second = {1 / step:g}\nbatch_cost = 0"), default_model="slowpar")
    sock = raw_socket(sup.endpoint)
    send(sock, op="generate", id="other", prompt="o", max_tokens=1000)
    for i in range(3):
        rid = f"c{i}"
        send(sock, op="generate", id=rid, prompt=rid, max_tokens=1000)
        while True:  # the first token of rid: a step has just ended and the next begun
            msg = recv(sock, 10)
            if msg["id"] == rid and msg["ev"] == "token":
                break
        sent = time.monotonic()
        send(sock, op="cancel", id=f"x{i}", target=rid)
        while True:
            msg = recv(sock, 10)
            if msg["id"] == rid and msg["ev"] == "end":
                break
        assert msg["reason"] == "cancelled"
        assert time.monotonic() - sent < 1.5 * step, (i, time.monotonic() - sent)
    send(sock, op="cancel", id="xo", target="other")
    sock.close()


def test_a_worker_killed_with_four_sequences_in_flight_resumes_all_four(start_supervisor):
    sup = start_supervisor(models=PAR, default_model="par")
    sock = raw_socket(sup.endpoint)
    ids = ["k1", "k2", "k3", "k4"]
    for rid in ids:
        send(sock, op="generate", id=rid, prompt=f"resume {rid}", max_tokens=40, temperature=0)
    seen: dict = {rid: [] for rid in ids}
    while min(sum(r.get("n", 0) for r in seen[rid] if r["ev"] == "token") for rid in ids) < 5:
        msg = recv(sock)
        seen[msg["id"]].append(msg)
    [w] = sup.workers("par")
    assert w["running"] == 4
    os.kill(w["pid"], signal.SIGKILL)
    got = read_all({sock: ids})
    for rid in ids:
        replies = seen[rid] + msgs(got[rid])
        end = replies[-1]
        assert end["ev"] == "end" and end["reason"] == "length", end
        # seq contiguous (text_of checks), nothing repeated or missing: the uninterrupted text.
        assert text_of(replies) == "".join(complete(f"resume {rid}", 0, 40, 0)[0])
        assert end["usage"]["completion_tokens"] == 40
    [new] = sup.workers("par")
    assert new["pid"] != w["pid"]
    sock.close()


def test_two_clients_take_turns_for_the_slots(start_supervisor):
    sup = start_supervisor(models=PAR.replace("load_seconds = 0.3", "load_seconds = 1.0"), default_model="par")
    a, b = raw_socket(sup.endpoint), raw_socket(sup.endpoint)
    a_ids = [f"a{i}" for i in range(8)]
    for rid in a_ids:  # all of a's first: they queue while the worker loads
        send(a, op="generate", id=rid, prompt=rid, max_tokens=8)
    wait_for(lambda: sup.status()["queues"].get("par") == 8, 10, "a's eight requests to be queued")
    for rid in ("b0", "b1"):
        send(b, op="generate", id=rid, prompt=rid, max_tokens=8)
    got = read_all({a: a_ids, b: ["b0", "b1"]})
    started = sorted(got, key=lambda rid: tokens_at(got[rid])[0])
    # Turns, one request each: b's two are among the first four to get a slot, not after a's eight.
    assert set(started[:4]) == {"a0", "b0", "a1", "b1"}, started
    a.close()
    b.close()
