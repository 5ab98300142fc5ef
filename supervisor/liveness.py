"""When the supervisor beats to its workers, and which workers it gives up on: silent ones
(hung, or stopped) and stalled ones (beating, but their request makes no progress). Pure: the
event loop sends the beats and kills what this names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

# A new worker process is silent until it has imported what it needs and started its heartbeat.
STARTUP_S = 15.0


class Watched(Protocol):
    wid: str
    last_heard: float
    hello: bool
    progress_at: float | None
    hung_for: float | None
    stalled_for: float | None


@dataclass(frozen=True)
class Verdict:
    wid: str
    silent_for: float = 0.0  # > 0: no heartbeat for this long
    stalled_for: float = 0.0  # > 0: no progress on its request for this long


class Liveness:
    def __init__(self, liveness: float, stall_timeout: float, now: float) -> None:
        self.liveness = liveness
        self.stall_timeout = stall_timeout
        self.beat_interval = liveness / 3
        self.next_beat = 0.0
        self.last_turn = now

    def turn(self, now: float, workers: Iterable[Watched]) -> tuple[bool, list[Verdict]]:
        """Called every loop turn: whether to beat now, and the workers to kill."""
        workers = list(workers)
        if now - self.last_turn > 1.5 * self.beat_interval:  # the loop turns at least once per beat
            # This loop itself was held up (a stopped process, an overloaded machine): the
            # workers' beats are waiting unread, so silence now proves nothing about them.
            for w in workers:
                w.last_heard = max(w.last_heard, now)
                if w.progress_at is not None:
                    w.progress_at = max(w.progress_at, now)
        self.last_turn = now
        beat = now >= self.next_beat
        if beat:
            self.next_beat = now + self.beat_interval
        verdicts = []
        for w in workers:
            if w.hung_for is not None or w.stalled_for is not None:
                continue  # given up on already
            silent = now - w.last_heard
            if silent > (self.liveness if w.hello else max(self.liveness, STARTUP_S)):
                w.hung_for = silent
                verdicts.append(Verdict(w.wid, silent_for=silent))
            elif w.progress_at is not None and now - w.progress_at > self.stall_timeout:
                # It beats (its heartbeat thread runs) but its request makes no progress: stuck in
                # a native call that released the GIL. Killed, its request resumes elsewhere.
                w.stalled_for = now - w.progress_at
                verdicts.append(Verdict(w.wid, stalled_for=w.stalled_for))
        return beat, verdicts
