"""systemd's notify protocol (sd_notify), spoken directly: datagrams on $NOTIFY_SOCKET.

Outside systemd (no NOTIFY_SOCKET) every call does nothing. No libsystemd needed: the protocol
is newline-separated KEY=VALUE lines in one datagram to a unix socket (an abstract one when the
path starts with "@").
"""

from __future__ import annotations

import os
import socket
from typing import Mapping

from loguru import logger


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        self._sock: socket.socket | None = None
        if path.startswith(("/", "@")):
            self._address = "\0" + path[1:] if path.startswith("@") else path
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # WatchdogSec=: ping at half the interval. WATCHDOG_PID, when set, names who must ping.
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_s: float | None = None
        self._next_watchdog = 0.0
        if self._sock is not None and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6 / 2
        self._last_status = ""

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> None:
        if self._sock is None or self._address is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:  # systemd gone or the socket full: never the daemon's problem
            logger.debug("sd_notify failed: {}", exc)

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        """Report what the supervisor is doing (shown by `systemctl status`); only changes are sent."""
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    @property
    def next_watchdog(self) -> float | None:
        return None if self.watchdog_s is None else self._next_watchdog

    def watchdog_due(self, now: float) -> None:
        """Ping the watchdog if its time has come."""
        if self.watchdog_s is not None and now >= self._next_watchdog:
            self._next_watchdog = now + self.watchdog_s
            self.watchdog()

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
