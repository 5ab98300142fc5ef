"""What `status`, `models`, the systemd status line and the metrics endpoint report: built from
the scheduler's view, the worker processes and the config. Read-only."""

from __future__ import annotations

import os
from typing import Any, Mapping

from loguru import logger

from stoker.protocol import results
from stoker.protocol.messages import Key, Op
from stoker.supervisor import __version__
from stoker.supervisor.config import Config
from stoker.supervisor.memory import needs_file
from stoker.supervisor.metrics import Metrics
from stoker.supervisor.model_costs import ModelCosts
from stoker.supervisor.requests import Forget
from stoker.supervisor.resources import rss_bytes
from stoker.supervisor.scheduler import Scheduler
from stoker.supervisor.sizes import format_size
from stoker.supervisor.states import WorkerState
from stoker.supervisor.worker_process import WorkerProcess
from stoker.workers.demo_model import demo_size_bytes


def status_data(config: Config, sched: Scheduler, procs: Mapping[str, WorkerProcess], vram_by_pid: Mapping[int, int],
                vram_available: bool, uptime: float, stopping: bool, now: float) -> dict[str, Any]:
    workers = []
    for slot in sched.workers.values():
        proc = procs.get(slot.wid)
        pid = proc.pid if proc is not None else None
        workers.append(results.WorkerInfo(
            slot.wid, pid, slot.model, slot.state.value, rss_bytes(pid), vram_by_pid.get(pid, 0) if pid is not None else 0,
            round(now - slot.idle_since, 1) if slot.idle_since is not None else 0.0, slot.served,
            slot.charge.ram, slot.charge.vram, slot.measured, slot.model in sched.pinned, slot.capacity,
            len(slot.jobs), None if slot.idle_deadline is None else round(max(0.0, slot.idle_deadline - now), 1),
        ))
    budget, used = sched.settings.budget, sched.used()

    def use(limit: int | None, held: int) -> results.BudgetUse:
        return results.BudgetUse(limit, held, None if limit is None else limit - held)

    supervisor = results.SupervisorInfo(os.getpid(), __version__, config.supervisor.endpoint, round(uptime, 1),
                                        "stopping" if stopping else "running", vram_available)
    memory = results.MemoryInfo(use(budget.ram, used.ram), use(budget.vram, used.vram), list(sched.memory_wait),
                                sorted(sched.pinned))
    return results.Status(supervisor, workers, sched.queue_depths(), memory).to_data()


def models_data(config: Config, sched: Scheduler, costs: ModelCosts, now: float) -> dict[str, Any]:
    rows = []
    for name, model in config.models.items():
        live = sched.workers_of(name, [WorkerState.IDLE, WorkerState.BUSY])
        facts = costs.files.facts(name, model.path, now) if needs_file(model) else None
        size = demo_size_bytes() if model.demo else facts.size if facts is not None else 0
        costs.cost(name, now)  # the estimate from what the look found (or the measurement)
        cost = sched.cost_of(name)
        rows.append(results.ModelInfo(
            name, model.backend, model.path, size, bool(live), len(live), model.n_ctx, model.n_gpu_layers, cost.ram,
            cost.vram, name in sched.measured_models, model.replicas,
            facts.unusable if facts is not None and facts.unusable else None, model.parallel, model.embedding,
        ))
    return results.Models(config.supervisor.default_model, rows).to_data()


def status_line(sched: Scheduler) -> str:
    """One line for `systemctl status`: the workers, what waits, the memory held."""
    workers = [f"{w.model} {w.state.value}" + (f" {len(w.jobs)}/{w.capacity}" if w.capacity > 1 else "")
               for w in sched.workers.values()]
    queued = sum(sched.queue_depths().values())
    budget, used = sched.settings.budget, sched.used()
    ram = f"RAM {format_size(used.ram)}" + (f" of {format_size(budget.ram)}" if budget.ram is not None else "")
    return (f"{len(workers)} worker{'s' if len(workers) != 1 else ''}"
            + (f" ({', '.join(workers)})" if workers else "") + f"; {queued} queued; {ram}")


def snapshot_metrics(metrics: Metrics, config: Config, sched: Scheduler) -> None:
    if not metrics.enabled:
        return
    states = {s.value: 0 for s in WorkerState}
    for w in sched.workers.values():
        states[w.state.value] += 1
    budget, used = sched.settings.budget, sched.used()
    memory = {("ram", "used"): used.ram, ("vram", "used"): used.vram}
    if budget.ram is not None:
        memory[("ram", "budget")] = budget.ram
    if budget.vram is not None:
        memory[("vram", "budget")] = budget.vram
    metrics.snapshot(sched.queue_depths(), config.models, states, memory)


def request_ended(metrics: Metrics, action: Forget, now: float) -> None:
    """Log a request that is over, and count it."""
    req, t = action.request, action.timings
    done = (f"{len(req.vectors)} vectors ({req.embed_tokens} tokens)" if req.request.op is Op.EMBED
            else f"{req.seq} tokens")
    logger.info("request {!r} of client {} on '{}': {}, {}; queued {} ms, load {} ms, ttft {} ms, total {} ms",
                req.rid, req.client.hex(), req.model, action.outcome, done, t[Key.QUEUED_MS], t[Key.LOAD_MS],
                t[Key.TTFT_MS], t[Key.TOTAL_MS])
    ttft = None if req.first_token is None else req.first_token - req.accepted
    stream_s = 0.0 if req.first_token is None else now - req.first_token
    metrics.request_ended(req.model, action.outcome, req.seq, ttft, stream_s)
