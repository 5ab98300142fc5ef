"""When to start a model's worker again after a failure, and when to stop trying for a while.

A crash-loop breaker in the spirit of an OTP supervisor's intensity/period: more than
`max_load_failures` workers of one model dying before they became ready within `window_s` trips
it. A tripped model is refused for `cooldown_s`; after that one more load is tried ("half open"),
and if that one fails too, it trips again at once. `reset` (the `load` op) retries at once.

Workers that die after they became ready are not load failures: they are replaced at once and
counted only to decide whether a model is still worth keeping warm.

Pure: it remembers failure times per model and answers questions given `now`.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartSettings:
    max_load_failures: int = 3  # more than this many within the window trips the breaker
    window_s: float = 60.0
    cooldown_s: float = 60.0
    backoff_initial_s: float = 0.5  # the second failure in the window waits this; each further one doubles
    backoff_max_s: float = 10.0


class RestartPolicy:
    def __init__(self, settings: RestartSettings | None = None) -> None:
        self.settings = settings or RestartSettings()
        self._load_failures: dict[str, deque[float]] = defaultdict(deque)
        self._crashes: dict[str, deque[float]] = defaultdict(deque)
        self._tripped_until: dict[str, float] = {}
        self._half_open: set[str] = set()
        self._last_reason: dict[str, str] = {}

    def _recent(self, times: deque[float], now: float) -> deque[float]:
        while times and times[0] <= now - self.settings.window_s:
            times.popleft()
        return times

    def record_load_failure(self, model: str, now: float, reason: str) -> None:
        """A worker died or gave up before its model was ready."""
        self._last_reason[model] = reason
        failures = self._recent(self._load_failures[model], now)
        failures.append(now)
        if model in self._half_open or len(failures) > self.settings.max_load_failures:
            self._half_open.discard(model)
            self._tripped_until[model] = now + self.settings.cooldown_s

    def record_crash(self, model: str, now: float) -> None:
        """A worker with its model loaded died unexpectedly (or was killed for hanging)."""
        self._crashes[model].append(now)

    def record_loaded(self, model: str) -> None:
        """A load succeeded: the model is healthy, so forget its load failures."""
        self._load_failures[model].clear()
        self._half_open.discard(model)

    def reset(self, model: str) -> None:
        """Someone asked for the model explicitly (`stoker load`): try it again now."""
        self._load_failures[model].clear()
        self._tripped_until.pop(model, None)
        self._half_open.discard(model)

    def tripped(self, model: str, now: float) -> bool:
        """Whether loads of this model are refused for now."""
        until = self._tripped_until.get(model)
        if until is None:
            return False
        if now < until:
            return True
        del self._tripped_until[model]
        self._load_failures[model].clear()
        self._half_open.add(model)
        return False

    def tripped_message(self, model: str, now: float) -> str:
        s = self.settings
        retry = max(0.0, self._tripped_until.get(model, now) - now)
        return (
            f"model '{model}' is marked failed: its workers died before becoming ready more than "
            f"{s.max_load_failures} times in {s.window_s:g} s; last error: "
            f"{self._last_reason.get(model, 'unknown')}. Fix the model, then run `stoker load {model}` "
            f"to retry now (stoker retries by itself in {retry:.0f} s)."
        )

    def recent_crashes(self, model: str, now: float) -> int:
        """Crashes of ready workers within the window."""
        return len(self._recent(self._crashes[model], now))

    def delay(self, model: str, now: float) -> float:
        """Seconds to wait before starting this model's next worker: the first start after a load
        failure is immediate, later ones back off exponentially. Crashes of ready workers never wait."""
        k = len(self._recent(self._load_failures[model], now))
        if k <= 1:
            return 0.0
        s = self.settings
        return min(s.backoff_initial_s * 2 ** (k - 2), s.backoff_max_s)
