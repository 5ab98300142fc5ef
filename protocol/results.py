"""The `data` of `result` replies, as typed values (the supervisor builds them, clients read them):
keys are spelled only here, as field names."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from stoker.protocol.messages import Key


@dataclass(frozen=True)
class WorkerInfo:
    """One worker in `status`. The field names are the wire keys."""

    id: str
    pid: int | None
    model: str
    state: str
    rss_bytes: int
    vram_bytes: int
    idle_s: float
    served: int
    # What the budget counts for it: its estimate until it is measured, then its peak.
    charged_ram_bytes: int = 0
    charged_vram_bytes: int = 0
    measured: bool = False
    pinned: bool = False
    slots: int = 1  # requests it runs at once at most (its model's `parallel`)
    running: int = 0  # requests it runs now (slots used)
    unload_in_s: float | None = None  # idle: seconds until it unloads for idleness (None: not counting down)


@dataclass(frozen=True)
class BudgetUse:
    budget: int | None  # None: not limited
    used: int
    free: int | None


@dataclass(frozen=True)
class MemoryInfo:
    ram: BudgetUse
    vram: BudgetUse
    waiting: list[str] = field(default_factory=list)  # models waiting for memory, first asker first
    pinned: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SupervisorInfo:
    pid: int
    version: str
    endpoint: str
    uptime_s: float
    state: str  # "running" or "stopping"
    gpu: bool


@dataclass(frozen=True)
class Status:
    """The `status` result."""

    supervisor: SupervisorInfo
    workers: list[WorkerInfo]
    queues: dict[str, int]
    memory: MemoryInfo | None = None  # old supervisors leave it out

    def to_data(self) -> dict[str, Any]:
        return _drop_none(asdict(self))

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> "Status":
        mem = data.get("memory")
        return cls(
            _of(SupervisorInfo, data["supervisor"]),
            [_of(WorkerInfo, w) for w in data["workers"]],
            dict(data["queues"]),
            None if mem is None else MemoryInfo(_of(BudgetUse, mem["ram"]), _of(BudgetUse, mem["vram"]),
                                                list(mem.get("waiting", [])), list(mem.get("pinned", []))),
        )


@dataclass(frozen=True)
class ModelInfo:
    """One configured model in `models`."""

    name: str
    backend: str
    path: str
    size_bytes: int
    loaded: bool
    workers: int
    n_ctx: int
    n_gpu_layers: int
    ram_bytes: int = 0  # what a worker of it costs: estimated, or measured once one ran
    vram_bytes: int = 0
    memory_measured: bool = False
    replicas: int = 1
    problem: str | None = None  # why it cannot load (its file is missing, not a regular file, ...)
    parallel: int = 1  # requests one worker of it runs at once
    embedding: bool = False  # it serves `embed`


@dataclass(frozen=True)
class Models:
    """The `models` result."""

    default: str
    models: list[ModelInfo]

    def to_data(self) -> dict[str, Any]:
        return {Key.DEFAULT: self.default, Key.MODELS: [_drop_none(asdict(r)) for r in self.models]}

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> "Models":
        return cls(data[Key.DEFAULT], [_of(ModelInfo, r) for r in data[Key.MODELS]])


def _of(cls: Any, data: Mapping[str, Any]) -> Any:
    """A dataclass from a map: the keys it knows (a newer supervisor may send more)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    """Optional keys (memory, problem) are left out rather than sent as null."""
    return {k: v for k, v in data.items() if v is not None}


def loaded(model: str) -> dict[str, Any]:
    return {Key.MODEL: model, "loaded": True}


def unloaded(model: str) -> dict[str, Any]:
    return {Key.MODEL: model, "unloaded": True}


def stopping() -> dict[str, Any]:
    return {"stopping": True}


def pong(version: str, instance: str, session: str, max_message_bytes: int | None = None) -> dict[str, Any]:
    data = {Key.PONG: True, Key.VERSION: version, Key.INSTANCE: instance, Key.SESSION: session}
    if max_message_bytes is not None:
        data[Key.MAX_MESSAGE_BYTES] = max_message_bytes
    return data


def cancelled(found: bool) -> dict[str, Any]:
    return {Key.CANCELLED: found}
