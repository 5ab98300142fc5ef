"""File descriptors: raise the limit, and never let clients use up what is left.

Every client connection holds a file descriptor in the supervisor. libzmq accepts connections
on its own I/O thread, and on an ipc:// endpoint an accept() that fails with EMFILE aborts the
whole process (libzmq 4.3's ipc_listener asserts on it), taking every worker with it. The only
way to stop libzmq from accepting is to stop clients from connecting: the socket file is renamed
aside (`<socket>.full`) while the supervisor is at its limit, and renamed back once clients have
left. Connected clients are served throughout; new ones find no socket file (the Python client
says the supervisor is full once its ping goes unanswered). A thread watches the listening
socket, so the gate closes within a connection or two of the limit, however fast clients arrive.
"""

from __future__ import annotations

import os
import resource
import select
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from stoker.protocol.endpoint import full_socket_path

LISTEN_BACKLOG = 32  # connections the kernel queues for libzmq to accept
# Descriptors kept free of clients: connections still queued or arriving while the gate closes,
# the worker processes (4 each: sentinel, stream, two sockets) and files the supervisor opens.
RESERVE_FDS = 2 * LISTEN_BACKLOG + 64
FDS_PER_WORKER = 8
_REOPEN_BELOW = 0.9  # the gate opens again once clients are down to this share of the limit
_CHECK_EVERY_S = 0.001  # the most often the open descriptors are counted while clients arrive
_WHILE_CLOSED_S = 0.25  # how often they are counted while the gate is closed


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target
        except (ValueError, OSError):
            pass
    return soft, soft


def open_fds() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself holds


def connections(path: Path) -> int:
    """How many connections to the Unix socket bound at `path` are open, accepted (state 03) or
    waiting to be (02): Linux lists each under its listener's path, the listener itself in 01.
    Read as bytes: any user's socket name may be in that table, valid UTF-8 or not."""
    tail = b" " + os.fsencode(path) + b"\n"
    try:
        with open("/proc/net/unix", "rb") as table:
            return sum(1 for line in table if line.endswith(tail) and line.split()[5] in (b"02", b"03"))
    except OSError:
        return 0


@dataclass(frozen=True)
class ClientLimit:
    """The most clients at once, and the open descriptors at which the gate closes regardless."""

    max_clients: int
    hard_fds: int

    @classmethod
    def derive(cls, fd_limit: int, baseline_fds: int, worker_slots: int, max_clients: int = 0) -> "ClientLimit":
        """From the descriptor limit, those open before any client (`baseline_fds`) and the
        workers there can be; `max_clients` (if set) can only lower the result."""
        hard = fd_limit - RESERVE_FDS - FDS_PER_WORKER * worker_slots
        room = max(1, hard - baseline_fds)
        return cls(min(max_clients, room) if max_clients else room, max(baseline_fds + 1, hard))


class ClientGate(threading.Thread):
    """Closes an ipc socket to new clients (by renaming its file aside) while too many are
    connected, and opens it again once enough have left.

    It counts the connections the kernel lists for the socket (and open descriptors, for the
    hard reserve) whenever a connection waits to be accepted or the event loop saw one accepted
    (`nudge`), and every quarter second while closed. Counting connections, not descriptors
    less a baseline, is exact: other threads open files for a moment, workers come and go, and
    clients may connect before the daemon has opened all it holds. `log` is called on each
    change, from this thread."""

    def __init__(self, path: Path, listen_fd: int, limit: ClientLimit, log: Callable[[str], None]) -> None:
        super().__init__(name="client-gate", daemon=True)
        self.path = path
        self.aside = full_socket_path(path)
        self.listen_fd = listen_fd
        self.limit = limit
        self.log = log
        self.closed = False
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._nudge_r, self._nudge_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._lock = threading.Lock()

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.listen_fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        poller.register(self._nudge_r, select.POLLIN)
        while True:
            ready = dict(poller.poll(_WHILE_CLOSED_S * 1000 if self.closed else None))
            if self._stop_r in ready:
                return
            if self._nudge_r in ready:
                _drain(self._nudge_r)
            try:
                self.check()
            except Exception as exc:  # a gate that died would never close again: say so, go on
                self.log(f"could not count the clients ({type(exc).__name__}: {exc})")
                time.sleep(_WHILE_CLOSED_S)
            if self.listen_fd in ready:
                time.sleep(_CHECK_EVERY_S)  # the listener stays readable until libzmq accepts

    def check(self) -> None:
        clients = connections(self.path)
        fds = open_fds()
        if not self.closed and (clients >= self.limit.max_clients or fds >= self.limit.hard_fds):
            self._close(f"{clients} clients connected ({fds} file descriptors open, limit "
                        f"{self.limit.max_clients} clients); new clients are refused until some leave")
        elif (self.closed and clients < _REOPEN_BELOW * self.limit.max_clients
              and fds < self.limit.hard_fds - LISTEN_BACKLOG):
            self._open(f"{clients} clients connected; taking new clients again")

    def _close(self, why: str) -> None:
        self._move(self.path, self.aside, True, why, "close the socket to new clients", f"; {why}")

    def _open(self, why: str) -> None:
        self._move(self.aside, self.path, False, why, "open the socket to new clients again", "")

    def _move(self, src: str, dst: str, closed: bool, why: str, what: str, after: str) -> None:
        """Rename the socket file (clients find it, or not) and log why."""
        with self._lock:
            try:
                os.rename(src, dst)
            except OSError as exc:
                self.log(f"cannot {what} ({exc}){after}")
                return
            self.closed = closed
        self.log(why)

    def nudge(self) -> None:
        """A connection was accepted: count again. libzmq's I/O thread can accept a connection
        between the kernel waking this thread and poll looking again, and poll then sleeps on:
        without this, with max_clients = 2, five clients got in."""
        try:
            os.write(self._nudge_w, b"x")
        except BlockingIOError:
            pass  # a count is due already

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        if self.is_alive():
            self.join(timeout=2.0)
        if not self.is_alive():  # else its descriptors stay: closed, their numbers could be another file's
            for fd in (self._stop_r, self._stop_w, self._nudge_r, self._nudge_w):
                os.close(fd)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass

