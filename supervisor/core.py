"""The supervisor's decisions put together, without I/O: what each event means for the requests,
the scheduler, the model ops and the model costs, as one list of actions for the event loop.

The loop (server.py) reads sockets, pipes, process sentinels and clocks, turns what it reads into
calls here, and carries out what comes back: start or stop a worker process, send a job or a
cancel to a worker, reply to a client, log a request that ended, report the status. Everything
between (a dispatch becoming a job for a worker, a scheduler's failure becoming an error reply,
a cancelled request leaving its queue) happens in here, so it can be tested in-process.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Iterable, Union

from stoker.protocol import messages as m
from stoker.protocol import results
from stoker.protocol.errors import BadRequest, ShuttingDown
from stoker.protocol.messages import ErrorCode, Key, Op, Reason, RequestId
from stoker.protocol.validation import CancelRequest, EmbedRequest, GenerateRequest, ModelRequest, Request
from stoker.supervisor import __version__
from stoker.supervisor.config import Config
from stoker.supervisor.memory import Cost
from stoker.supervisor.model_costs import ModelCosts
from stoker.supervisor.model_files import ModelFiles
from stoker.supervisor.model_ops import ModelOps, check_model
from stoker.supervisor.reports import models_data
from stoker.supervisor.requests import (
    CancelOnWorker, ClientId, Forget, Reply, RequestAction, RequestKey, Requests, RunOnWorker, Unqueue,
)
from stoker.supervisor.restart_policy import RestartPolicy, RestartSettings
from stoker.supervisor.scheduler import (
    Action, Answer, Dispatch, FailJob, Job, ModelLimits, Notify, Scheduler, SchedulerSettings, StartWorker,
    StopWorker,
)

_WORK_OPS = (Op.GENERATE, Op.EMBED, Op.LOAD, Op.UNLOAD)


@dataclass(frozen=True)
class ReportStatus:
    """Answer a `status` request: the loop has what it needs (processes, GPU readings)."""

    client: ClientId
    rid: RequestId


@dataclass(frozen=True)
class BeginShutdown:
    """A client asked the supervisor to shut down."""


Out = Union[StartWorker, StopWorker, RunOnWorker, CancelOnWorker, Reply, Forget, ReportStatus, BeginShutdown]


class Core:
    def __init__(self, config: Config, files: ModelFiles, instance: str | None = None) -> None:
        sup = config.supervisor
        self.config = config
        self.scheduler = Scheduler(
            SchedulerSettings(max_queue=sup.max_queue, idle_timeout=sup.idle_timeout, max_retries=sup.max_retries,
                              load_wait=sup.load_wait),
            RestartPolicy(RestartSettings(max_load_failures=sup.crash_loop_max, window_s=sup.crash_loop_window,
                                          cooldown_s=sup.crash_loop_cooldown)),
            limits={name: ModelLimits(mc.replicas, None if mc.idle_timeout < 0 else mc.idle_timeout, mc.parallel)
                    for name, mc in config.models.items()},
        )
        # A new instance id every start: clients tell from it that the supervisor that had their
        # requests is gone (see protocol/README.md, "Restarts").
        self.requests = Requests(instance or secrets.token_hex(8))
        self.ops = ModelOps()
        self.costs = ModelCosts(config, files, self.scheduler)
        self.models_waiters: list[tuple[ClientId, Any]] = []  # `models` ops waiting for looks at files
        self.load_ms: dict[str, float] = {}  # per loaded worker: how long its load took
        self.stopping = False
        # What has been decided and not yet handed to the loop. Kept here, not in each call's
        # locals, so that a bug raising part-way through a call loses none of the decisions made
        # before it (a worker the scheduler counts on being started): see `take`.
        self._out: list[Out] = []

    def take(self) -> list[Out]:
        """The actions decided so far and not yet returned: after a call raised, the loop carries
        them out, so the scheduler's state and the processes do not drift apart."""
        out, self._out = self._out, []
        return out

    # ---- clients -------------------------------------------------------------------------------

    def request(self, client: ClientId, req: Request, now: float) -> list[Out]:
        """One valid request. Raises the StokerError to answer it with when it is refused."""
        key = (client, req.id)
        if key in self.requests or key in self.ops:
            # id null: an error with the id would read as the running request's terminal reply.
            raise BadRequest(f"id {req.id!r} is already in use by one of your requests in flight; "
                             "use a new id for each request", None)
        if self.stopping and req.op in _WORK_OPS:
            raise ShuttingDown("the supervisor is shutting down and takes no new work", req.id)
        if isinstance(req, GenerateRequest):  # an embed too
            model = req.model or self.config.supervisor.default_model
            check_model(self.config, model, req.id)
            sup = self.config.supervisor
            max_tokens = min(req.sampling.get(Key.MAX_TOKENS, sup.default_max_tokens), sup.max_tokens_limit)
            if isinstance(req, EmbedRequest):
                max_tokens = 0
                if not self.config.models[model].embedding:
                    raise BadRequest(f"model '{model}' does not serve embeddings; pick a model with embedding = true "
                                     "in its configuration (`stoker models`)", req.id)
            key = self.requests.accept(client, req, model, max_tokens, now).key
            self._admit(key, now)
            self._run(self.requests.acknowledge(key), now)
        elif isinstance(req, CancelRequest):
            found, actions = self.requests.cancel((client, req.target), now)
            self._run(actions, now)  # the target's end comes before the cancel's result
            self._out.append(Reply(client, m.result(req.id, results.cancelled(found))))
        elif isinstance(req, ModelRequest):
            check_model(self.config, req.model, req.id)
            key = self.ops.add(client, req.id, req.op, req.model, req.pin, req.keep_alive)
            if req.op is Op.LOAD:
                self._admit(key, now)
            else:
                self._execute(self.scheduler.unload(key, req.model, now), now)
        elif req.op is Op.PING:
            sup = self.config.supervisor
            self._out.append(Reply(client, m.result(req.id, results.pong(
                __version__, self.requests.instance, self.requests.session_of(client), sup.max_message_bytes))))
        elif req.op is Op.STATUS:
            self._out.append(ReportStatus(client, req.id))
        elif req.op is Op.MODELS:
            # Answered once every model's file has been looked at (or its look ran out of time).
            for name in self.config.models:
                self.costs.cost(name, now)
            if self.costs.looking():
                self.models_waiters.append((client, req.id))
            else:
                self._out.append(Reply(client, m.result(req.id, models_data(self.config, self.scheduler,
                                                                            self.costs, now))))
        else:
            assert req.op is Op.SHUTDOWN, req.op
            self._out += [Reply(client, m.result(req.id, results.stopping())), BeginShutdown()]
        return self.take()

    def id_in_flight(self, client: ClientId, rid: Any) -> bool:
        return (client, rid) in self.requests or (client, rid) in self.ops

    def internal_error(self, client: ClientId, rid: Any, now: float) -> list[Out]:
        """Handling a request raised (a bug): it ends with `internal`, and so does what it started.
        What was decided before it raised is carried out first."""
        key = (client, rid)
        message = "internal error in the supervisor; see its log"
        if key in self.requests:
            self._run(self.requests.abandon(key, ErrorCode.INTERNAL, message, now), now)
        elif key in self.ops:
            self._fail(key, ErrorCode.INTERNAL, message, now)
        else:
            self._out.append(Reply(client, m.error(rid, ErrorCode.INTERNAL, message)))
        return self.take()

    def client_gone(self, client: ClientId, now: float) -> list[Out]:
        """The client disconnected: its replies have nowhere to go, so stop spending work on them."""
        self.ops.client_gone(client)
        self._run(self.requests.client_gone(client, now), now)
        return self.take()

    def has_work_of(self, client: ClientId) -> bool:
        return any(k[0] == client for k in self.ops.pending) or any(r.client == client for r in self.requests)

    # ---- workers -------------------------------------------------------------------------------

    def worker_hello(self, wid: str, model: str = "", rss: int | None = None) -> None:
        """Its process runs; `rss`: its memory before its model, what every worker of that backend
        costs on top of its model (the estimates count it from now on)."""
        if rss:
            self.costs.overhead[self.config.models[model].backend] = rss
        self.scheduler.worker_hello(wid)

    def worker_ready(self, wid: str, load_ms: float, now: float) -> list[Out]:
        self.load_ms[wid] = load_ms
        self._execute(self.scheduler.worker_ready(wid, now), now)
        return self.take()

    def worker_load_failed(self, wid: str, message: str) -> None:
        self.scheduler.worker_load_failed(wid, message)

    def tokens(self, wid: str, job_no: int, text: str, n: int, now: float, logprobs: list | None = None) -> None:
        req = self.requests.on_worker(job_no, wid)
        if req is not None:  # else late: the request was answered, or runs elsewhere after a crash
            self.requests.tokens(req, text, n, now, logprobs)

    def vectors(self, wid: str, job_no: int, start: int, vectors: list, tokens: int, now: float) -> None:
        req = self.requests.on_worker(job_no, wid)
        if req is not None:  # else late, as tokens can be
            self.requests.vectors(req, start, vectors, tokens, now)

    def flush(self, now: float) -> list[Out]:
        """Tokens read together go to their clients in one frame per request."""
        self._run(self.requests.flush(), now)
        return self.take()

    def job_ended(self, wid: str, job_no: int, now: float, reason: Reason | None = None, prompt_tokens: int = 0,
                  error: tuple[ErrorCode, str] | None = None) -> list[Out]:
        """The worker's end (reason) or error for a job; its slot is free again."""
        req = self.requests.on_worker(job_no, wid)
        if req is not None:
            if error is not None:
                self._run(self.requests.fail(req.key, error[0], error[1], now), now)
            else:
                assert reason is not None
                self._run(self.requests.ended(req, reason, prompt_tokens, now), now)
            self._execute(self.scheduler.job_done(wid, now, req.key), now)
        return self.take()

    def runs_nothing(self, wid: str) -> bool:
        slot = self.scheduler.workers.get(wid)
        return slot is None or not slot.jobs

    def worker_exited(self, wid: str, now: float, detail: str) -> list[Out]:
        """Its process is gone. What it was told to stop ends with it; what it ran waits to resume."""
        self.load_ms.pop(wid, None)
        ended = self.requests.cancelling_on(wid)
        self._run(self.requests.worker_exited(wid, now), now)
        self._execute(self.scheduler.worker_exited(wid, now, detail, ended), now)
        return self.take()

    def measured(self, costs: Iterable[tuple[str, Cost]], now: float) -> list[Out]:
        for wid, cost in costs:
            self._execute(self.scheduler.worker_measured(wid, cost, now), now)
        return self.take()

    # ---- time ----------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Out]:
        """Timers: idle unloads, due restarts, memory waits, requests' deadlines, file looks."""
        self._execute(self.scheduler.tick(now), now)
        due = self.costs.files.next_deadline()
        if due is not None and now >= due:
            self._files_looked(now)
        self._run(self.requests.deadlines_due(now), now)
        return self.take()

    def next_deadline(self) -> float | None:
        times = [self.scheduler.next_deadline(), self.costs.files.next_deadline(), self.requests.next_deadline()]
        return min((t for t in times if t is not None), default=None)

    def files_looked(self, now: float) -> list[Out]:
        """Looks at model files finished (or ran out of time): admit what waited for them."""
        self._files_looked(now)
        return self.take()

    def begin_shutdown(self, now: float) -> list[Out]:
        """Stop taking work; what waits fails, running requests may finish (the loop's grace)."""
        self.stopping = True
        self._execute(self.scheduler.drain(now), now)
        for key in self.costs.release_all():
            self._fail(key, ErrorCode.SHUTTING_DOWN, "the supervisor is shutting down; retry once it is running again",
                       now)
        return self.take()

    def drain_over(self, now: float) -> list[Out]:
        """The grace is over: every request still in flight ends with shutting_down."""
        self._run(self.requests.shutdown(now), now)
        return self.take()

    # ---- internals: each adds what it decides to self._out -------------------------------------

    def _files_looked(self, now: float) -> None:
        for key in self.costs.looked(now):
            self._admit(key, now)
        if self.models_waiters and not self.costs.looking():
            waiting, self.models_waiters = self.models_waiters, []
            data = models_data(self.config, self.scheduler, self.costs, now)
            self._out += [Reply(client, m.result(rid, data)) for client, rid in waiting]

    def _admit(self, key: RequestKey, now: float) -> None:
        """Hand a generate or a load to the scheduler once its model's cost is known; until then
        it waits for the look at the model's file."""
        req, op = self.requests.get(key), self.ops.get(key)
        if req is None and op is None:
            return  # ended while it waited (cancelled, its client gone, its deadline)
        model = req.model if req is not None else op.model  # type: ignore[union-attr]
        problem = self.costs.cost(model, now)
        if problem is None:
            self.costs.hold(model, key)
        elif problem:
            self._fail(key, ErrorCode.LOAD_FAILED, problem, now)
        elif req is not None:
            r = req.request
            # Turns by the request's `user` if it names one (callers of a gateway share its
            # connection), else by its connection.
            client = key[0] if r.user is None else ("user", r.user)
            job = Job(key, model, keep_alive=r.keep_alive, client=client, priority=r.priority)
            self._execute(self.scheduler.submit(job, now), now)
        else:
            self._execute(self.scheduler.load(key, model, now, pin=op.pin,  # type: ignore[union-attr]
                                              keep_alive=op.keep_alive), now)  # type: ignore[union-attr]

    def _fail(self, key: RequestKey, code: ErrorCode, message: str, now: float) -> None:
        if key in self.requests:
            self._run(self.requests.fail(key, code, message, now), now)
            return
        reply = self.ops.fail(key, code, message)
        if reply is not None:
            self._out.append(Reply(*reply))

    def _execute(self, actions: list[Action], now: float) -> None:
        """The scheduler's actions: workers to start and stop go out; the rest become requests'.
        Starts and stops go out before anything else is worked out, so that a bug in the rest
        cannot leave a worker the scheduler counts on without its process."""
        self._out += [a for a in actions if isinstance(a, (StartWorker, StopWorker))]
        for action in actions:
            if isinstance(action, Dispatch):
                load_ms = self.load_ms.get(action.wid, 0.0)
                self._run(self.requests.dispatched(action.key, action.wid, now, load_ms), now)
            elif isinstance(action, FailJob):
                self._fail(action.key, action.code, action.message, now)
            elif isinstance(action, Notify):
                self._run(self.requests.notify(action.key, action.loading, action.position), now)
            elif isinstance(action, Answer):
                reply = self.ops.answered(action.key)
                if reply is not None:
                    self._out.append(Reply(*reply))

    def _run(self, actions: list[RequestAction], now: float) -> None:
        """The request machine's actions: a request leaving its queue is done here; the rest go out."""
        for action in actions:
            if isinstance(action, Unqueue):
                if not self.costs.unhold(action.key):
                    self.scheduler.cancel_queued(action.key)
            else:
                self._out.append(action)
