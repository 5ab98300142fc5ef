"""Limits that keep one client from taking the supervisor down: file descriptors, and replies
left unread. Real supervisors, real sockets; the supervisor's RSS is printed as it goes."""

from __future__ import annotations

import re
import resource
import time
from pathlib import Path

import msgpack
import psutil
import pytest
import zmq

from stoker.protocol.client import Client
from stoker.protocol.errors import Unreachable
from stoker.supervisor.fd_limits import connections
from stoker.workers.fake_backend import complete as fake_complete
from tests.conftest import wait_for
from tests.integration.helpers import raw_socket

SLOW = '[models.slow]\nbackend = "fake"\ntokens_per_second = 50\nend_every = 0\n'
FAST = '[models.fast]\nbackend = "fake"\nend_every = 0\n'
FLOOD_S = 60.0
MiB = 1024 * 1024


def test_four_times_the_fd_limit_in_clients_neither_kills_the_supervisor_nor_its_stream(start_supervisor):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4096:
        pytest.skip(f"this test process may open {hard} files; it needs 4096 for its clients")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    sup = start_supervisor(SLOW, default_model="slow", nofile=256)
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 4 * 1024 + 100)
    socks: list[zmq.Socket] = []
    try:
        with Client(sup.endpoint, timeout=30) as c:
            stream = c.generate("a stream in progress", max_tokens=200)
            tokens = iter(stream)
            first = next(tokens)
            for _ in range(4 * 256):  # 4x the limit, as fast as they come
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(sup.endpoint)
                s.send(msgpack.packb({"v": 1, "op": "ping", "id": 1}))
                socks.append(s)
            text = first + "".join(tokens)
            assert sup.proc.poll() is None, sup.log()[-3000:]
            assert text == "".join(fake_complete("a stream in progress", 0, 200, 0)[0])
            assert stream.end is not None and stream.end.usage["completion_tokens"] == 200
            # Clients that got in were served; the rest were refused, with a log line.
            answered = sum(1 for s in socks if s.poll(2000 if s is socks[0] else 0))
            assert 10 < answered < 256, answered
            assert "new clients are refused until some leave" in sup.log()
            with pytest.raises(Unreachable, match="as many clients as it takes"):
                with Client(sup.endpoint) as late:
                    late.ping(timeout=0.5)
            for s in socks:
                s.close()
            socks.clear()
            # Once they have left, new clients get in again, and the supervisor serves as before.
            wait_for(lambda: "taking new clients again" in sup.log(), 10, "the socket to open again")
            with Client(sup.endpoint, timeout=30) as again:
                assert again.complete("after", max_tokens=3).text == "".join(fake_complete("after", 0, 3, 0)[0])
    finally:
        for s in socks:
            s.close()
        ctx.term()
    assert sup.stop() == 0


def _rss(sup) -> int:
    return psutil.Process(sup.proc.pid).memory_info().rss


def _flood(sup, capsys, what: str, send) -> tuple[int, int, int]:
    """Run `send` (one request on a socket that never reads) for FLOOD_S seconds; print the
    supervisor's RSS every 5 s. Returns (before, peak, after the flooder left)."""
    before = _rss(sup)
    sock = raw_socket(sup.endpoint, rcvhwm=10)  # sends as fast as the supervisor reads
    peak, sent = before, 0
    started = next_sample = next_print = time.monotonic()
    samples = []
    while (now := time.monotonic()) - started < FLOOD_S:
        for _ in range(200):
            try:
                send(sock, sent)
                sent += 1
            except zmq.Again:
                break
        if now >= next_sample:
            rss = _rss(sup)
            peak = max(peak, rss)
            next_sample = now + 0.2
            if now >= next_print:
                samples.append(f"{now - started:.0f} s {rss / MiB:.1f}")
                next_print = now + 5
        time.sleep(0.0005)
    sock.close()
    with Client(sup.endpoint, timeout=10) as c:  # still serving, and the flooder is gone
        c.ping()
    time.sleep(2)
    after = _rss(sup)
    with capsys.disabled():
        print(f"\n{what} flood, {sent} requests in {FLOOD_S:.0f} s; supervisor RSS (MiB): before {before / MiB:.1f}, "
              + ", ".join(samples) + f"; peak {peak / MiB:.1f} (sampled every 0.2 s), after {after / MiB:.1f}")
    return before, peak, after


def test_a_client_that_floods_pings_and_never_reads_is_dropped_and_rss_stays_bounded(start_supervisor, capsys):
    sup = start_supervisor(FAST, default_model="fast")

    def ping(sock, n):
        sock.send(msgpack.packb({"v": 1, "op": "ping", "id": n}), zmq.NOBLOCK)

    other = Client(sup.endpoint, timeout=10)
    before, peak, after = _flood(sup, capsys, "ping", ping)
    assert peak - before < 96 * MiB, (before, peak)  # unbounded, it grew by 1 GB in 60 s
    assert after - before < 48 * MiB, (before, after)
    assert "unread, over the limit" in sup.log() and "dropping it" in sup.log()
    assert other.ping()["pong"]  # another client was served throughout
    other.close()


def test_a_client_that_floods_generates_and_never_reads_is_dropped_and_rss_stays_bounded(start_supervisor, capsys):
    sup = start_supervisor(FAST, default_model="fast")

    def generate(sock, n):
        sock.send(msgpack.packb({"v": 1, "op": "generate", "id": n, "prompt": f"p{n}", "max_tokens": 64}),
                  zmq.NOBLOCK)

    before, peak, after = _flood(sup, capsys, "generate", generate)
    assert peak - before < 96 * MiB, (before, peak)  # unbounded, it grew by 180 MB in 60 s
    assert after - before < 48 * MiB, (before, after)
    assert "dropping it" in sup.log()
    with Client(sup.endpoint, timeout=10) as c:
        assert c.complete("still", max_tokens=4).text == "".join(fake_complete("still", 0, 4, 0)[0])
        wait_for(lambda: not c.status()["queues"], 10, "the flooder's queued requests to be gone")


def test_a_small_max_clients_lets_that_many_clients_in(start_supervisor):
    """The supervisor's own descriptors (its sockets, pipes, forkserver) are not clients: with
    max_clients = 3, three clients get in, the gate counts exactly three and closes the socket
    to a fourth, and the three are served on."""
    sup = start_supervisor(max_clients=3)
    _no_connections(sup)
    clients = [Client(sup.endpoint, timeout=5) for _ in range(3)]
    try:
        for c in clients:
            assert c.ping()["pong"]
        wait_for(lambda: "new clients are refused" in sup.log(), 5, "the gate to close at three clients")
        for c in clients:
            assert c.ping()["pong"]
        assert re.findall(r"(\d+) clients connected", sup.log()) == ["3"]
    finally:
        for c in clients:
            c.close()


def test_clients_already_connected_are_served_while_the_socket_is_set_aside(start_supervisor):
    """Full means new clients find no socket file; a connected client's ping still gets its pong
    (it used to fail at once on the missing file), and a new one is told the supervisor is full."""
    sup = start_supervisor(max_clients=2)
    _no_connections(sup)
    served: list[Client] = []
    try:
        for _ in range(2):
            served.append(Client(sup.endpoint, timeout=5))
            assert served[-1].ping(timeout=1)["pong"]
        wait_for(lambda: "new clients are refused" in sup.log(), 5, "the gate to close at two clients")
        for c in served:
            assert c.ping()["pong"]
        with Client(sup.endpoint) as new, pytest.raises(Unreachable, match="as many clients as it takes"):
            new.ping(timeout=0.5)
    finally:
        for c in served:
            c.close()


def _no_connections(sup) -> None:
    """Wait for the connections of the fixture's readiness probe to close: they count too."""
    path = Path(sup.endpoint.removeprefix("ipc://"))
    wait_for(lambda: connections(path) == 0, 5, "the probe's connection to close")
