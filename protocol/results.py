"""The `data` of `result` replies: one builder per shape, so keys are spelled only here."""

from __future__ import annotations

from typing import Any, Mapping

from stoker.protocol.messages import Key


def worker_status(wid: str, pid: int | None, model: str, state: str, rss_bytes: int, vram_bytes: int,
                  idle_s: float, served: int) -> dict[str, Any]:
    return {"id": wid, "pid": pid, Key.MODEL: model, Key.STATE: state, "rss_bytes": rss_bytes,
            "vram_bytes": vram_bytes, "idle_s": idle_s, "served": served}


def worker_memory(ram_bytes: int, vram_bytes: int, measured: bool, pinned: bool) -> dict[str, Any]:
    """What the budget counts for a worker: its estimate until it is measured, then its peak."""
    return {"charged_ram_bytes": ram_bytes, "charged_vram_bytes": vram_bytes, "measured": measured, "pinned": pinned}


def memory(ram_budget: int | None, ram_used: int, vram_budget: int | None, vram_used: int,
           waiting: list[str], pinned: list[str]) -> dict[str, Any]:
    """Budgets (None: not limited), what workers hold of them, and models waiting for memory."""
    def one(budget: int | None, used: int) -> dict[str, Any]:
        return {"budget": budget, "used": used, "free": None if budget is None else budget - used}

    return {"ram": one(ram_budget, ram_used), "vram": one(vram_budget, vram_used), "waiting": waiting,
            "pinned": pinned}


def model_memory(ram_bytes: int, vram_bytes: int, measured: bool, replicas: int) -> dict[str, Any]:
    return {"ram_bytes": ram_bytes, "vram_bytes": vram_bytes, "memory_measured": measured, "replicas": replicas}


def status(pid: int, version: str, endpoint: str, uptime_s: float, stopping: bool, gpu: bool,
           workers: list[dict[str, Any]], queues: Mapping[str, int]) -> dict[str, Any]:
    return {
        "supervisor": {"pid": pid, Key.VERSION: version, "endpoint": endpoint, "uptime_s": uptime_s,
                       Key.STATE: "stopping" if stopping else "running", "gpu": gpu},
        "workers": workers,
        "queues": dict(queues),
    }


def model_row(name: str, backend: str, path: str, size_bytes: int, workers: int, n_ctx: int,
              n_gpu_layers: int) -> dict[str, Any]:
    return {"name": name, "backend": backend, "path": path, "size_bytes": size_bytes,
            "loaded": workers > 0, "workers": workers, "n_ctx": n_ctx, "n_gpu_layers": n_gpu_layers}


def model_problem(why: str) -> dict[str, Any]:
    """Why a model cannot load (its file is missing, not a regular file, or unreadable)."""
    return {"problem": why}


def models(default: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {Key.DEFAULT: default, Key.MODELS: rows}


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
