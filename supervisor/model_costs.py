"""What each model costs in memory before a worker of it is measured, and the work that waits
for that answer (a look at the model's file, made off the event loop by ModelFiles)."""

from __future__ import annotations

from collections import defaultdict
from typing import Hashable

from loguru import logger

from stoker.supervisor.config import Config
from stoker.supervisor.memory import estimate, needs_file
from stoker.supervisor.model_files import ModelFiles
from stoker.supervisor.scheduler import Scheduler
from stoker.workers.demo_model import demo_size_bytes


class ModelCosts:
    def __init__(self, config: Config, files: ModelFiles, scheduler: Scheduler) -> None:
        self.config = config
        self.files = files
        self.scheduler = scheduler
        self.overhead: dict[str, int] = {}  # per backend: a worker's RSS before its model, as measured
        self._warned: set[str] = set()
        # Work waiting for a first look at its model's file (generate and load keys), in order;
        # dicts, so that a client that leaves with many waiting costs no scans.
        self._waiters: dict[str, dict[Hashable, None]] = defaultdict(dict)
        self._model_of: dict[Hashable, str] = {}

    def cost(self, name: str, now: float) -> str | None:
        """Give the scheduler the model's cost before it places a worker: measured, or estimated
        from the model's file. Returns "" once it has one, None while the file is still being
        looked at, or why the model cannot load at all."""
        if name in self.scheduler.measured_models:
            return ""
        model = self.config.models[name]
        facts = None
        if needs_file(model):
            facts = self.files.facts(name, model.path, now)
            if facts is None:
                return None
            if facts.unusable and not model.demo:  # the demo's file is written at its first load
                return facts.unusable
        overhead = self.overhead.get(model.backend)
        if facts is not None and facts.gguf is None:
            # Count what its file holds, and its process, until a worker of it is measured; the
            # load says what is wrong with the file, if anything is.
            if facts.problem and not model.demo and name not in self._warned:
                self._warned.add(name)
                logger.warning("cannot estimate the memory of model '{}' ({}); counting its file and its "
                               "process until a worker of it is measured", name, facts.problem)
            cost = estimate(model, None, overhead, demo_size_bytes() if model.demo else facts.size)
        else:
            cost = estimate(model, facts.gguf if facts is not None else None, overhead)
        self.scheduler.set_cost(name, cost)
        return ""

    def hold(self, model: str, key: Hashable) -> None:
        """Park work until the look at its model's file ends."""
        self._waiters[model][key] = None
        self._model_of[key] = model

    def unhold(self, key: Hashable) -> bool:
        """Drop parked work; False if it is not parked."""
        model = self._model_of.pop(key, None)
        if model is None:
            return False
        del self._waiters[model][key]
        return True

    def looked(self, now: float) -> list[Hashable]:
        """Looks that ended (or ran out of time): the work parked for them, to admit again."""
        keys: list[Hashable] = []
        for name, _facts in self.files.poll(now):
            keys += self._waiters.pop(name, {})
        for key in keys:
            del self._model_of[key]
        return keys

    def release_all(self) -> list[Hashable]:
        """Shutting down: everything parked, to fail."""
        keys = [key for keys in self._waiters.values() for key in keys]
        self._waiters.clear()
        self._model_of.clear()
        return keys

    def looking(self) -> bool:
        return any(self.files.looking(name) for name in self.config.models)
