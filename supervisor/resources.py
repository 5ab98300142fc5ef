"""How much memory a worker holds: resident RAM (psutil) and GPU memory (NVML, when there is a GPU)."""

from __future__ import annotations

import ctypes
import os
import threading
import time
from typing import TYPE_CHECKING, Callable, TypeVar

import psutil
from loguru import logger

from stoker.supervisor.memory import Budget
from stoker.supervisor.sizes import AUTO

if TYPE_CHECKING:
    from stoker.supervisor.config import SupervisorConfig

T = TypeVar("T")


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

    def __init__(self, enabled: bool = True) -> None:
        self._handles: list = []
        if not enabled:
            return
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


def call_with_timeout(fn: Callable[[], T], timeout: float, default: T) -> tuple[T, bool]:
    """fn() on a thread of its own; (its result, True), or (default, False) if it has not
    returned within `timeout` seconds (the thread is left to finish, or hang, on its own). For
    calls into drivers and file systems that can block for ever (NVML on a wedged GPU)."""
    box: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="call-with-timeout", daemon=True)
    thread.start()
    thread.join(timeout)
    if errors:
        raise errors[0]
    if box:
        return box[0], True
    return default, False


class GpuMemoryWatch(threading.Thread):
    """Reads each process's GPU memory from NVML every `interval` seconds, off the event loop (a
    wedged driver can block NVML calls for ever); the loop reads `snapshot`, and `taken_at`
    tells how fresh it is. Without a GPU it does nothing."""

    def __init__(self, vram: VramProbe, interval: float) -> None:
        super().__init__(name="gpu-memory", daemon=True)
        self.vram = vram
        self.interval = interval
        self.snapshot: dict[int, int] = {}
        self.taken_at = 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            usage = self.vram.usage()
            self.snapshot, self.taken_at = usage, time.monotonic()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()


def trim_heap() -> None:
    """Hand memory the process freed back to the system (glibc keeps it otherwise): after a large
    buffer is dropped, the supervisor's RSS comes back down."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def probe_memory(sup: "SupervisorConfig", slow_call_s: float, measure_s: float) -> tuple[VramProbe, "GpuMemoryWatch", Budget]:
    """NVML and the budget, at start. Initialising NVML can take a while, and a wedged driver can
    block it for ever: here on a thread with a time limit, and from then on only off the event
    loop (GpuMemoryWatch)."""
    vram, _ = call_with_timeout(VramProbe, slow_call_s, None)
    if vram is None:
        logger.warning("NVML did not answer within {:g} s; GPU memory is not measured or budgeted", slow_call_s)
        vram = VramProbe(enabled=False)
    watch = GpuMemoryWatch(vram, measure_s)
    if vram.available:
        watch.start()
    budget, _ = call_with_timeout(lambda: resolve_budget(sup, vram), slow_call_s, None)
    if budget is None:
        logger.warning("measuring free memory did not finish within {:g} s; GPU memory is not budgeted", slow_call_s)
        budget = resolve_budget(sup, VramProbe(enabled=False))
    return vram, watch, budget
