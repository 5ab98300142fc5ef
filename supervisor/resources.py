"""How much memory a worker holds: resident RAM (psutil) and GPU memory (NVML, when there is a GPU)."""

from __future__ import annotations

import psutil


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
