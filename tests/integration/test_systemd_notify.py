"""The supervisor speaks systemd's notify protocol to a real datagram socket standing in for systemd."""

from __future__ import annotations

import socket
import time

from tests.conftest import wait_for


def test_ready_status_watchdog_and_stopping_reach_notify_socket(start_supervisor, short_dir):
    path = str(short_dir / "notify.sock")
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(path)
    systemd.settimeout(0.1)
    got: list[tuple[float, str]] = []

    def drain() -> list[str]:
        while True:
            try:
                got.append((time.monotonic(), systemd.recv(4096).decode()))
            except socket.timeout:
                return [text for _, text in got]

    try:
        sup = start_supervisor(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
        wait_for(lambda: any("READY=1" in m for m in drain()), 10, "READY=1")
        [ready] = [m for m in drain() if "READY=1" in m]
        assert "STATUS=0 workers; 0 queued; RAM" in ready and f"MAINPID={sup.proc.pid}" in ready
        with sup.client() as c:
            c.load("echo")
        wait_for(lambda: any("STATUS=1 worker (echo idle)" in m for m in drain()), 10, "a STATUS with the model")
        t0 = time.monotonic()
        time.sleep(1.2)
        drain()
        pings = [t for t, m in got if m == "WATCHDOG=1" and t >= t0]
        assert len(pings) >= 3, got  # every 0.2 s (half of WatchdogSec = 0.4 s)
        assert max(b - a for a, b in zip(pings, pings[1:])) < 0.4
        assert sup.stop() == 0
        assert any(m.startswith("STOPPING=1") for m in drain())
    finally:
        systemd.close()


def test_without_notify_socket_nothing_is_sent_and_nothing_breaks(start_supervisor):
    sup = start_supervisor(env={"NOTIFY_SOCKET": "", "WATCHDOG_USEC": "1000"})
    with sup.client() as c:
        assert c.complete("x", model="echo", max_tokens=2).text
    assert sup.stop() == 0
