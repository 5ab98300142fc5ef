"""How much memory a worker holds: resident RAM (psutil) and GPU memory (NVML, when there is a GPU)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import psutil

from stoker.supervisor.memory import Budget
from stoker.supervisor.sizes import AUTO

if TYPE_CHECKING:
    from stoker.supervisor.config import SupervisorConfig


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_worker(n_threads: int, replicas: int, cores: int) -> int:
    """A worker's threads: as configured, or the cores split between the model's replicas (two
    1-thread workers of a small model outrun one 2-thread worker)."""
    return n_threads or max(1, cores // replicas)


def rss_bytes(pid: int | None) -> int:
    if pid is None:
        return 0
    try:
        return psutil.Process(pid).memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


class VramProbe:
    """Per-process GPU memory from NVML. Without an NVIDIA driver every answer is 0."""

    def __init__(self) -> None:
        self._handles: list = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no driver, no library, no device: all mean "no VRAM to report"
            self._handles = []

    @property
    def available(self) -> bool:
        return bool(self._handles)

    def free_bytes(self) -> list[int]:
        """Free memory of each GPU now."""
        free = []
        for handle in self._handles:
            try:
                free.append(int(self._nvml.nvmlDeviceGetMemoryInfo(handle).free))
            except Exception:
                free.append(0)
        return free

    def usage(self) -> dict[int, int]:
        """pid -> bytes of GPU memory, over every GPU."""
        used: dict[int, int] = {}
        for handle in self._handles:
            try:
                procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except Exception:
                continue
            for p in procs:
                used[p.pid] = used.get(p.pid, 0) + (p.usedGpuMemory or 0)
        return used


def resolve_budget(sup: "SupervisorConfig", vram: VramProbe) -> Budget:
    """The budgets: as configured, or measured now. Without a GPU, VRAM is not budgeted at all
    (unless a vram_budget is configured)."""
    ram = sup.ram_budget
    if ram == AUTO:
        ram = int(psutil.virtual_memory().available * (1 - sup.ram_margin))
    gpus = vram.free_bytes()
    if sup.vram_budget == AUTO:
        vram_total = int(sum(gpus) * (1 - sup.vram_margin)) if gpus else None
    else:
        vram_total = sup.vram_budget * max(1, len(gpus))  # the setting is per GPU
    return Budget(ram=ram, vram=vram_total)
