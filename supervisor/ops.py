"""What the supervisor does for each protocol op. Mixed into Supervisor (server.py)."""

from __future__ import annotations

import heapq
import os
import time
from typing import TYPE_CHECKING, Any

from stoker.protocol import messages as m
from stoker.protocol import results
from stoker.protocol.errors import BadRequest, ShuttingDown, UnknownModel
from stoker.protocol.messages import ErrorCode, InfoState, Key, Op
from stoker.protocol.validation import CancelRequest, GenerateRequest, ModelRequest, Request
from stoker.supervisor import __version__
from stoker.supervisor.inflight import ActiveRequest, Key_, PendingOp
from stoker.supervisor.memory import needs_file
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
            self.send(client, m.result(req.id, results.pong(__version__, self.instance, self.session_of(client))))
        elif req.op is Op.STATUS:
            self.send(client, m.result(req.id, self.status_data()))
        elif req.op is Op.MODELS:
            # Answered once every model's file has been looked at (or its look ran out of time).
            for name in self.config.models:
                self.model_cost(name, now)
            if any(self.files.looking(name) for name in self.config.models):
                self.models_waiters.append((client, req.id))
            else:
                self.send(client, m.result(req.id, self.models_data(now)))
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
        job_no = self.new_job_no()
        active = ActiveRequest(client, req, model, max_tokens, now, job_no)
        if req.resume_tokens:
            # A continuation of a stream a supervisor that went away began: this one streams on
            # from the client's last token, exactly as after a worker's crash.
            active.seq = req.resume_tokens
            active.texts.append(req.resume_text)
        self.requests[key] = active
        self.by_job[job_no] = key
        if req.deadline is not None:
            if len(self.deadlines) > 2 * len(self.requests) + 1000:
                # Entries of requests that ended stay until their time: keep them bounded.
                self.deadlines = [d for d in self.deadlines if d[2] in self.requests]
                heapq.heapify(self.deadlines)
            heapq.heappush(self.deadlines, (now + req.deadline, job_no, key))
        self.admit(key, now)
        if key in self.requests and not active.acknowledged:
            # Every accepted generate is answered at once (clients tell from that whether a
            # supervisor that restarted had their request): it waits for its model's file.
            active.waited_for_load = True
            self.send_info(active, InfoState.LOADING)

    def admit(self: "Supervisor", key: "Key_", now: float) -> None:
        """Hand a generate or a load to the scheduler once its model's cost is known; until then
        it waits for the look at the model's file."""
        req = self.requests.get(key)
        op = self.pending_ops.get(key) if req is None else None
        if req is None and op is None:
            return  # ended while it waited (cancelled, its client gone, its deadline)
        model = req.model if req is not None else op.model
        problem = self.model_cost(model, now)
        if problem is None:
            self.file_waiters[model].append(key)
        elif problem:
            self._fail(key, ErrorCode.LOAD_FAILED, problem)
        elif req is not None:
            r = req.request
            job = Job(key, model, keep_alive=r.keep_alive, client=req.client, priority=r.priority)
            self._execute(self.scheduler.submit(job, now), now)
        else:
            self._execute(self.scheduler.load(key, model, now, pin=op.pin), now)

    def unhold(self: "Supervisor", key: "Key_") -> bool:
        """Drop a request that waits for its model's file; False if it is not waiting there."""
        for waiting in self.file_waiters.values():
            if key in waiting:
                waiting.remove(key)
                return True
        return False

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
        self.pending_ops[key] = PendingOp(client, req.op, req.model, req.pin)
        if req.op is Op.LOAD:
            self.admit(key, now)
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
        vram = self.gpu_watch.snapshot  # read off this loop: NVML can block (GpuMemoryWatch)
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

    def models_data(self: "Supervisor", now: float) -> dict[str, Any]:
        rows = []
        for name, model in self.config.models.items():
            live = self.scheduler.workers_of(name, [WorkerState.IDLE, WorkerState.BUSY])
            facts = self.files.facts(name, model.path, now) if needs_file(model) else None
            size = demo_size_bytes() if model.demo else facts.size if facts is not None else 0
            row = results.model_row(name, model.backend, model.path, size, len(live), model.n_ctx,
                                    model.n_gpu_layers)
            self.model_cost(name, now)  # the estimate from what the look found (or the measurement)
            cost = self.scheduler.cost_of(name)
            row.update(results.model_memory(cost.ram, cost.vram, name in self.scheduler.measured_models,
                                            model.replicas))
            if facts is not None and facts.unusable:
                row.update(results.model_problem(facts.unusable))
            rows.append(row)
        return results.models(self.config.supervisor.default_model, rows)
