"""When to start a model's worker again after a failure, and when to give up.

Pure: it remembers failure times per model and answers questions given `now`.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartSettings:
    """A model whose worker fails to load `max_load_failures` times within `window_s` is given up
    until the oldest of those failures leaves the window. The first failure in the window
    restarts at once; each further one backs off exponentially from `backoff_initial_s` up to
    `backoff_max_s`."""

    max_load_failures: int = 3
    window_s: float = 60.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0


class RestartPolicy:
    def __init__(self, settings: RestartSettings | None = None) -> None:
        self.settings = settings or RestartSettings()
        self._load_failures: dict[str, deque[float]] = defaultdict(deque)
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._last_reason: dict[str, str] = {}

    def _recent(self, times: deque[float], now: float) -> deque[float]:
        while times and times[0] <= now - self.settings.window_s:
            times.popleft()
        return times

    def record_load_failure(self, model: str, now: float, reason: str) -> None:
        """A worker died or gave up before its model was ready."""
        self._load_failures[model].append(now)
        self._failures[model].append(now)
        self._last_reason[model] = reason

    def record_crash(self, model: str, now: float) -> None:
        """A worker with its model loaded died unexpectedly."""
        self._failures[model].append(now)

    def record_loaded(self, model: str) -> None:
        """A load succeeded: earlier load failures were not consecutive, so forget them."""
        self._load_failures[model].clear()

    def gave_up(self, model: str, now: float) -> bool:
        """Whether loads of this model are refused for now."""
        return len(self._recent(self._load_failures[model], now)) >= self.settings.max_load_failures

    def give_up_message(self, model: str, now: float) -> str:
        s = self.settings
        times = self._recent(self._load_failures[model], now)
        retry = max(0.0, times[0] + s.window_s - now) if times else 0.0
        return (
            f"model '{model}' failed to load {len(times)} times in {s.window_s:.0f} s; "
            f"last error: {self._last_reason.get(model, 'unknown')}. "
            f"Fix the model's configuration; stoker tries again in {retry:.0f} s."
        )

    def recent_failures(self, model: str, now: float) -> int:
        """Failures of any kind (load or crash) within the window."""
        return len(self._recent(self._failures[model], now))

    def delay(self, model: str, now: float) -> float:
        """Seconds to wait before starting this model's next worker."""
        k = self.recent_failures(model, now)
        if k <= 1:
            return 0.0
        s = self.settings
        return min(s.backoff_initial_s * 2 ** (k - 2), s.backoff_max_s)
