"""What wakes the event loop besides its sockets: signals, and background threads that finished
something (a look at a model file). Both arrive as readable descriptors in its poll."""

from __future__ import annotations

import os
import signal
import socket
import threading
from typing import Any

# The handlers do nothing: the wakeup fd carries the signal number into the poll loop.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # HUP: its terminal closed


class Wakeup:
    def __init__(self) -> None:
        self._bg_r, self._bg_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sig_r: socket.socket | None = None
        self._sig_w: socket.socket | None = None
        self._old: dict[Any, Any] = {}
        # A thread still running at close (a look at a stuck file) must not write to the fd
        # number afterwards: by then it may be another file's.
        self._lock = threading.Lock()
        self._closed = False

    @property
    def fds(self) -> list[int]:
        return [self._bg_r] + ([self._sig_r.fileno()] if self._sig_r is not None else [])

    def catch_signals(self) -> None:
        self._sig_r, self._sig_w = socket.socketpair()
        self._sig_r.setblocking(False)
        self._sig_w.setblocking(False)
        self._old[None] = signal.set_wakeup_fd(self._sig_w.fileno(), warn_on_full_buffer=False)
        for s in STOP_SIGNALS:
            self._old[s] = signal.signal(s, lambda *_: None)

    def signals(self, ready: dict[Any, int]) -> list[signal.Signals]:
        """The signals that arrived, if their descriptor is among the ready ones."""
        if self._sig_r is None or self._sig_r.fileno() not in ready:
            return []
        try:
            return [signal.Signals(n) for n in self._sig_r.recv(64)]
        except BlockingIOError:
            return []

    def background_done(self, ready: dict[Any, int]) -> bool:
        """Whether a background thread woke the loop (and empty the pipe if so)."""
        if self._bg_r not in ready:
            return False
        try:
            while os.read(self._bg_r, 4096):
                pass
        except BlockingIOError:
            pass
        return True

    def wake(self) -> None:
        """Called from background threads."""
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._bg_w, b"x")
            except BlockingIOError:  # already full: the loop will wake anyway
                pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._bg_r)
            os.close(self._bg_w)
        if self._sig_r is not None and self._sig_w is not None:
            signal.set_wakeup_fd(self._old.pop(None))
            for s, h in self._old.items():
                signal.signal(s, h)
            self._sig_r.close()
            self._sig_w.close()
