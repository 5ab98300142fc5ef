"""What a model's file holds, found out off the event loop.

Reading a GGUF header opens the file, and so can merely looking at it: `stat` on a hung network
mount blocks, and opening a FIFO blocks until a writer comes. The event loop must never wait on
either, so each model's file is inspected by a thread of its own, with a time limit. The loop
asks `facts()`, gets an answer at once (known facts, or None: an inspection is under way), and
collects finished inspections with `poll()`, woken by the `notify` callback.

A thread stuck in the kernel cannot be stopped: past its time limit the model is reported
unusable, and no second thread is started for it until the first one returns.
"""

from __future__ import annotations

import os
import queue
import stat
import threading
from dataclasses import dataclass
from typing import Callable

from stoker.supervisor.memory import GgufError, GgufFacts, gguf_facts

# A file seen this recently is not looked at again (each new request would otherwise cost a
# thread); a changed file is noticed at the next look after that.
RECHECK_S = 30.0
# After a failed look, the next request looks again (the user may have fixed the file) once
# this much time has passed.
RETRY_FAILED_S = 1.0


@dataclass(frozen=True)
class FileFacts:
    """What one look at a model's file found."""

    size: int = 0
    gguf: GgufFacts | None = None  # None: no readable GGUF header (`problem` says why)
    problem: str = ""  # why the memory cannot be estimated from the file (its process is counted)
    unusable: str = ""  # why the model cannot load at all: its requests fail with load_failed


def inspect_file(path: str) -> FileFacts:
    """Look at a model file: only a regular file is opened, and without blocking (a FIFO put in
    its place after the stat opens at once and fails the check)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return FileFacts(unusable=f"model file {path} does not exist")
    except OSError as exc:
        return FileFacts(unusable=f"cannot read model file {path}: {exc.strerror or exc}")
    if not stat.S_ISREG(info.st_mode):
        return FileFacts(unusable=f"model file {path} is {_kind(info.st_mode)}, not a regular file")
    try:
        return FileFacts(size=info.st_size, gguf=gguf_facts(path))
    except GgufError as exc:
        return FileFacts(size=info.st_size, problem=str(exc))
    except OSError as exc:
        return FileFacts(size=info.st_size, problem=f"cannot read {path}: {exc.strerror or exc}")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


@dataclass
class _Look:
    path: str
    started: float
    token: int
    reported: bool = False  # past its time limit, and said so


class ModelFiles:
    """Per model: the facts last found about its file, and the looks under way."""

    def __init__(self, notify: Callable[[], None], timeout: float = 10.0,
                 inspect: Callable[[str], FileFacts] = inspect_file) -> None:
        self._notify = notify
        self.timeout = timeout
        self._inspect = inspect
        self._known: dict[str, tuple[str, FileFacts, float]] = {}  # name -> (path, facts, when)
        self._looking: dict[str, _Look] = {}
        self._done: queue.SimpleQueue[tuple[str, int, FileFacts]] = queue.SimpleQueue()
        self._tokens = 0

    def facts(self, name: str, path: str, now: float) -> FileFacts | None:
        """What is known of the file, or None while the first look is under way. A look is
        started when nothing is known, when what is known is old, or after a failure."""
        known = self._known.get(name)
        look = self._looking.get(name)
        if look is not None and look.reported:
            # Stuck past its limit: answer with that, and start no second thread.
            return known[1] if known is not None and known[0] == path else None
        if known is not None and known[0] == path:
            _, facts, when = known
            stale = now - when >= (RETRY_FAILED_S if facts.unusable else RECHECK_S)
            if stale and look is None:
                self._start(name, path, now)
                if facts.unusable:
                    return None  # the user may have fixed it: wait for the new look
            return facts
        if look is None:
            self._start(name, path, now)
        return None

    def looking(self, name: str) -> bool:
        look = self._looking.get(name)
        return look is not None and not look.reported

    def _start(self, name: str, path: str, now: float) -> None:
        self._tokens += 1
        look = self._looking[name] = _Look(path, now, self._tokens)

        def run() -> None:
            try:
                facts = self._inspect(path)
            except Exception as exc:  # whatever went wrong, the loop hears of it
                facts = FileFacts(problem=f"cannot read {path}: {type(exc).__name__}: {exc}")
            self._done.put((name, look.token, facts))
            self._notify()

        threading.Thread(target=run, name=f"inspect-{name[:40]}", daemon=True).start()

    def poll(self, now: float) -> list[tuple[str, FileFacts]]:
        """Looks that finished, and looks past their time limit (as unusable), since last time."""
        out: list[tuple[str, FileFacts]] = []
        while True:
            try:
                name, token, facts = self._done.get_nowait()
            except queue.Empty:
                break
            look = self._looking.get(name)
            if look is None or look.token != token:
                continue
            del self._looking[name]
            self._known[name] = (look.path, facts, now)
            if not look.reported:
                out.append((name, facts))
        for name, look in self._looking.items():
            if not look.reported and now - look.started >= self.timeout:
                look.reported = True
                facts = FileFacts(unusable=f"reading model file {look.path} took longer than {self.timeout:g} s "
                                           "(a hung network mount, or a device?); not loading it")
                self._known[name] = (look.path, facts, now)
                out.append((name, facts))
        return out

    def next_deadline(self) -> float | None:
        return min((look.started + self.timeout for look in self._looking.values() if not look.reported),
                   default=None)
