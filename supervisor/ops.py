"""What the supervisor does for each protocol op. Mixed into Supervisor (server.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stoker.protocol import messages as m
from stoker.protocol import results
from stoker.protocol.errors import BadRequest, ShuttingDown, UnknownModel
from stoker.protocol.messages import Key, Op
from stoker.protocol.validation import CancelRequest, GenerateRequest, ModelRequest, Request
from stoker.supervisor import __version__
from stoker.supervisor.inflight import ActiveRequest, PendingOp
from stoker.supervisor.resources import rss_bytes
from stoker.supervisor.scheduler import Job
from stoker.supervisor.states import WorkerState
from stoker.workers.demo_model import DEMO_MODEL_NAME, INSTALL_HINT, demo_size_bytes

if TYPE_CHECKING:
    from stoker.supervisor.outbox import ClientId
    from stoker.supervisor.server import Supervisor

_WORK_OPS = (Op.GENERATE, Op.LOAD, Op.UNLOAD)


class OpsMixin:
    def handle_request(self: "Supervisor", client: "ClientId", req: Request, now: float) -> None:
        """Answer one valid request (or start the work that will answer it)."""
        if (client, req.id) in self.requests or (client, req.id) in self.pending_ops:
            # id null: an error with the id would read as the running request's terminal reply.
            raise BadRequest(f"id {req.id!r} is already in use by one of your requests in flight; "
                             "use a new id for each request", None)
        if self.stopping and req.op in _WORK_OPS:
            raise ShuttingDown("the supervisor is shutting down and takes no new work", req.id)
        if req.op is Op.GENERATE:
            assert isinstance(req, GenerateRequest)
            self._generate(client, req, now)
        elif req.op is Op.CANCEL:
            assert isinstance(req, CancelRequest)
            self.send(client, m.result(req.id, results.cancelled(self._cancel(client, req.target))))
        elif req.op in (Op.LOAD, Op.UNLOAD):
            assert isinstance(req, ModelRequest)
            self._model_op(client, req, now)
        elif req.op is Op.PING:
            self.send(client, m.result(req.id, results.pong(__version__)))
        elif req.op is Op.STATUS:
            self.send(client, m.result(req.id, self.status_data()))
        elif req.op is Op.MODELS:
            self.send(client, m.result(req.id, self.models_data()))
        elif req.op is Op.SHUTDOWN:
            self.send(client, m.result(req.id, results.stopping()))
            self.begin_shutdown(now)

    def _check_model(self: "Supervisor", name: str, rid: Any) -> None:
        if name in self.config.models:
            return
        if name == self.config.supervisor.default_model == DEMO_MODEL_NAME:
            raise UnknownModel(f"no model is configured and the demo model is not installed: {INSTALL_HINT}", rid)
        raise UnknownModel(f"model '{name}' not found; `stoker models` lists what is configured", rid)

    def _generate(self: "Supervisor", client: "ClientId", req: GenerateRequest, now: float) -> None:
        model = req.model or self.config.supervisor.default_model
        self._check_model(model, req.id)
        key = (client, req.id)
        sup = self.config.supervisor
        max_tokens = min(req.sampling.get(Key.MAX_TOKENS, sup.default_max_tokens), sup.max_tokens_limit)
        self.refresh_cost(model)
        job_no = self.new_job_no()
        self.requests[key] = ActiveRequest(client, req, model, max_tokens, now, job_no)
        self.by_job[job_no] = key
        job = Job(key, model, keep_alive=req.keep_alive, client=client, priority=req.priority)
        self._execute(self.scheduler.submit(job, now), now)

    def _cancel(self: "Supervisor", client: "ClientId", target: Any) -> bool:
        key = (client, target)
        req = self.requests.get(key)
        if req is None:
            return False
        if not self.end_if_queued(key, req):
            self.cancel_running(req)
        return True

    def _model_op(self: "Supervisor", client: "ClientId", req: ModelRequest, now: float) -> None:
        self._check_model(req.model, req.id)
        key = (client, req.id)
        self.pending_ops[key] = PendingOp(client, req.op, req.model)
        if req.op is Op.LOAD:
            self.refresh_cost(req.model)
            self._execute(self.scheduler.load(key, req.model, now, pin=req.pin), now)
        else:
            self._execute(self.scheduler.unload(key, req.model, now), now)

    def answer_op(self: "Supervisor", key: Any) -> None:
        op = self.pending_ops.pop(key, None)
        if op is not None:
            data = results.loaded(op.model) if op.op is Op.LOAD else results.unloaded(op.model)
            self.send(op.client, m.result(key[1], data))

    def status_data(self: "Supervisor") -> dict[str, Any]:
        now = time.monotonic()
        sched = self.scheduler
        vram = self.vram.usage()
        workers = []
        for slot in sched.workers.values():
            proc = self.procs.get(slot.wid)
            pid = proc.pid if proc is not None else None
            row = results.worker_status(
                slot.wid, pid, slot.model, slot.state.value, rss_bytes(pid),
                vram.get(pid, 0) if pid is not None else 0,
                round(now - slot.idle_since, 1) if slot.idle_since is not None else 0.0, slot.served,
            )
            row.update(results.worker_memory(slot.charge.ram, slot.charge.vram, slot.measured,
                                             slot.model in sched.pinned))
            workers.append(row)
        budget, used = sched.settings.budget, sched.used()
        data = results.status(
            os.getpid(), __version__, self.config.supervisor.endpoint, round(now - self.started, 1),
            self.stopping, self.vram.available, workers, sched.queue_depths(),
        )
        data["memory"] = results.memory(budget.ram, used.ram, budget.vram, used.vram, list(sched.memory_wait),
                                        sorted(sched.pinned))
        return data

    def models_data(self: "Supervisor") -> dict[str, Any]:
        rows = []
        for name, model in self.config.models.items():
            live = self.scheduler.workers_of(name, [WorkerState.IDLE, WorkerState.BUSY])
            if model.demo:
                size = demo_size_bytes()
            else:
                size = Path(model.path).stat().st_size if model.path and Path(model.path).is_file() else 0
            row = results.model_row(name, model.backend, model.path, size, len(live), model.n_ctx,
                                    model.n_gpu_layers)
            self.refresh_cost(name)
            cost = self.scheduler.cost_of(name)
            row.update(results.model_memory(cost.ram, cost.vram, name in self.scheduler.measured_models,
                                            model.replicas))
            rows.append(row)
        return results.models(self.config.supervisor.default_model, rows)
