"""The supervisor's event loop: the one place that owns sockets, worker processes and timers.

It does I/O only: it polls, decodes what arrives (client frames, worker frames, process exits,
signals, timers), feeds it to the pure parts, and carries out the actions they return. The
decisions live in those parts: Scheduler (which worker, which request next, when to load and
unload), Requests (a request's life and what its client hears), Liveness (which worker to give
up on), RestartPolicy (when to stop restarting), ModelCosts (what a model costs).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import zmq
from loguru import logger

from stoker.protocol import messages as m
from stoker.protocol import results
from stoker.protocol.codec import decode
from stoker.protocol.errors import BadRequest, ShuttingDown, StokerError
from stoker.protocol.messages import ErrorCode, Key, Message, Op, Reason
from stoker.protocol.validation import (
    CancelRequest, GenerateRequest, ModelRequest, Request, parse_request, request_id_of, request_id_of_frame,
)
from stoker.workers.wire import (
    LOAD_MS, REQUEST, RESUME, RID, RSS, T, W,
)
from stoker.supervisor import __version__
from stoker.supervisor.config import Config
from stoker.supervisor.frontend import Delivery, open_frontend
from stoker.supervisor.liveness import Liveness
from stoker.supervisor.memory import Cost
from stoker.supervisor.metrics import Metrics
from stoker.supervisor.model_costs import ModelCosts
from stoker.supervisor.model_files import ModelFiles
from stoker.supervisor.model_ops import ModelOps, check_model
from stoker.supervisor.notify import Notifier
from stoker.supervisor.wakeup import Wakeup
from stoker.supervisor.reports import models_data, request_ended, snapshot_metrics, status_data, status_line
from stoker.supervisor.requests import (
    CancelOnWorker, ClientId, Forget, Reply, RequestAction, RequestKey, Requests, RunOnWorker, Unqueue,
)
from stoker.supervisor.resources import probe_memory, threads_per_worker, usable_cores
from stoker.supervisor.restart_policy import RestartPolicy, RestartSettings
from stoker.supervisor.scheduler import (
    Action, Answer, Dispatch, FailJob, Job, ModelLimits, Notify, Scheduler, SchedulerSettings, StartWorker,
    StopWorker,
)
from stoker.supervisor.worker_pool import WorkerPool
from stoker.supervisor.worker_process import WorkerProcess, start_forkserver

_RETRY_S = 0.005  # how soon to retry sending to a client whose pipe was full
_RECV_BATCH = 200  # frames read from one socket before looking at the others
_MEASURE_S = 1.0  # how often workers' real memory is read
_SLOW_CALL_S = 10.0  # the most a call into a driver (NVML) may take before it is given up on
_KINDS = {kind.value: kind for kind in W}  # W(value) costs an Enum call per token
_WORK_OPS = (Op.GENERATE, Op.LOAD, Op.UNLOAD)


@dataclass
class Supervisor:
    """The daemon: bind, serve until shut down, clean up."""

    config: Config
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        sup = self.config.supervisor
        self.scheduler = Scheduler(
            SchedulerSettings(max_queue=sup.max_queue, idle_timeout=sup.idle_timeout, max_retries=sup.max_retries,
                              load_wait=sup.load_wait),
            RestartPolicy(RestartSettings(max_load_failures=sup.crash_loop_max, window_s=sup.crash_loop_window,
                                          cooldown_s=sup.crash_loop_cooldown)),
            limits={name: ModelLimits(m.replicas, None if m.idle_timeout < 0 else m.idle_timeout)
                    for name, m in self.config.models.items()},
        )
        # A new instance id every start: clients tell from it that the supervisor that had their
        # requests is gone (see protocol/README.md, "Restarts").
        self.requests = Requests(secrets.token_hex(8))
        self.ops = ModelOps()
        self.wakeup = Wakeup()
        self.costs = ModelCosts(self.config, ModelFiles(self.wakeup.wake, timeout=sup.file_timeout), self.scheduler)
        self.models_waiters: list[tuple[ClientId, Any]] = []  # `models` ops waiting for looks at files
        self.liveness = Liveness(sup.worker_liveness, sup.stall_timeout, time.monotonic())
        self.cores = usable_cores()
        self.notifier = Notifier()
        self.metrics = Metrics()  # started in bind()
        self.next_measure = 0.0
        self.gone: set[ClientId] = set()  # clients found gone while sending, handled between steps
        self.stopping = False
        self.drain_deadline: float | None = None
        self.log_dir = Path(sup.state_dir) / "workers"

    # ---- lifecycle -----------------------------------------------------------------------------

    def bind(self) -> None:
        """Bind the frontend (clients) and backend (workers) sockets, and the metrics endpoint."""
        sup = self.config.supervisor
        self.metrics = Metrics(sup.metrics)  # first: it may fail, holding nothing yet
        if self.metrics.enabled:
            logger.info("metrics at http://{}/metrics", sup.metrics)
        self.ctx = zmq.Context()
        worker_slots = min(64, sum(mc.replicas for mc in self.config.models.values()) + 1)
        self.frontend = open_frontend(self.ctx, sup, worker_slots)
        self.private_dir = Path(tempfile.mkdtemp(prefix="stoker-"))
        self.poller = zmq.Poller()
        self.pool = WorkerPool(self.ctx, self.private_dir, self.log_dir, sup.worker_liveness, self.poller)
        self.vram, self.gpu_watch, budget = probe_memory(sup, _SLOW_CALL_S, _MEASURE_S)
        start_forkserver(gpu=any(mc.n_gpu_layers for mc in self.config.models.values()))
        self.scheduler.settings = replace(self.scheduler.settings, budget=budget)
        logger.info("memory budget: {}{}", budget.describe(Cost(budget.ram or 0, budget.vram or 0)),
                    "" if budget.vram is not None else " (no GPU: GPU memory is not budgeted)")

    def serve(self) -> int:
        """Run until shut down; returns the exit code."""
        self.bind()
        self.wakeup.catch_signals()
        self.frontend.settled()
        logger.info("stoker {} listening on {} (pid {})", __version__, self.config.supervisor.endpoint, os.getpid())
        self.notifier.ready(status_line(self.scheduler))
        try:
            self._loop()
        finally:
            self.notifier.close()
            self.wakeup.close()
            self._close()
        logger.info("stoker stopped")
        return 0

    def _loop(self) -> None:
        for sock in (self.frontend.socket, self.frontend.monitor, *self.wakeup.fds):
            self.poller.register(sock, zmq.POLLIN)
        while not (self.stopping and not self.pool):
            ready = dict(self.poller.poll(self._poll_timeout_ms()))
            now = time.monotonic()
            for signum in self.wakeup.signals(ready):
                logger.info("received {}; shutting down", signum.name)
                self.begin_shutdown(now)
            if self.wakeup.background_done(ready):
                self._files_looked(now)
            drained = self._read_workers() if self.pool.socket in ready else True
            for proc in self.pool.ready_streams(ready):
                self._read_stream(proc)
            dead = self.pool.exited(ready)
            if dead and (drained or self._read_workers()):
                # Everything it sent before dying comes first. If the socket is not drained yet
                # (many workers starting at once), the sentinel is still readable next time round.
                # Its stream holds all it wrote, since it can write no more.
                for proc in dead:
                    self._read_stream(proc)
                    self._worker_exited(proc, time.monotonic())
            self.gone.update(self.frontend.disconnected())  # before reading: see Frontend.disconnected
            self._drop_gone()
            if self.frontend.socket in ready:
                self._read_clients()
                self.gone.update(self.frontend.disconnected())  # seen while reading
            self._drop_gone()
            self._timers(time.monotonic())
            self.gone.update(self.frontend.flush())
            self._drop_gone()

    def _poll_timeout_ms(self) -> int:
        deadlines = [self.scheduler.next_deadline(), self.drain_deadline, self.next_measure,
                     self.costs.files.next_deadline(), self.requests.next_deadline()]
        deadlines.append(self.notifier.next_watchdog)
        if self.pool:
            deadlines.append(self.liveness.next_beat)
        deadlines += self.pool.deadlines()
        due = min((d for d in deadlines if d is not None), default=None)
        timeout = 1.0 if due is None else max(0.0, due - time.monotonic())
        if self.frontend.pending:
            timeout = min(timeout, _RETRY_S)
        return int(timeout * 1000) + 1

    def begin_shutdown(self, now: float) -> None:
        """Stop taking work, let running requests finish within the grace, then stop the workers.
        A second signal skips the grace."""
        if self.stopping:
            self.drain_deadline = now
            return
        self.stopping = True
        self.notifier.stopping()
        self.drain_deadline = now + self.config.supervisor.drain_timeout
        self._execute(self.scheduler.drain(now), now)
        for key in self.costs.release_all():
            self._fail(key, ErrorCode.SHUTTING_DOWN, "the supervisor is shutting down; retry once it is running again",
                       now)

    def _close(self) -> None:
        self.frontend.close(retry_s=_RETRY_S)
        self.gpu_watch.stop()
        self.metrics.close()
        self.pool.close()
        self.ctx.term()
        shutil.rmtree(self.private_dir, ignore_errors=True)

    # ---- timers --------------------------------------------------------------------------------

    def _timers(self, now: float) -> None:
        self._execute(self.scheduler.tick(now), now)
        self._heartbeats(now)
        due = self.costs.files.next_deadline()
        if due is not None and now >= due:
            self._files_looked(now)
        self._run(self.requests.deadlines_due(now), now)
        if now >= self.next_measure:
            self.next_measure = now + _MEASURE_S
            self._measure(now)
            snapshot_metrics(self.metrics, self.config, self.scheduler)
            if not self.stopping:
                self.notifier.status(status_line(self.scheduler))
        self.notifier.watchdog_due(now)  # from this loop: systemd restarts one whose loop is wedged
        grace = self.config.supervisor.stop_grace
        if self.drain_deadline is not None and now >= self.drain_deadline:
            self.drain_deadline = None
            self._run(self.requests.shutdown(now), now)
            self.pool.terminate_all(now, grace)
        self.pool.escalate(now, grace)

    def _measure(self, now: float) -> None:
        """Replace estimates with what loaded workers really hold."""
        for wid, cost in self.pool.measured(self.scheduler, self.gpu_watch):
            self._execute(self.scheduler.worker_measured(wid, cost, now), now)

    def _files_looked(self, now: float) -> None:
        """Looks at model files finished (or ran out of time): admit what waited for them."""
        for key in self.costs.looked(now):
            self._admit(key, now)
        if self.models_waiters and not self.costs.looking():
            waiting, self.models_waiters = self.models_waiters, []
            for client, rid in waiting:
                self.send(client, m.result(rid, models_data(self.config, self.scheduler, self.costs, now)))

    def _heartbeats(self, now: float) -> None:
        """Beat to every worker; kill one that has been silent for the liveness window (hung or
        stopped) or made no progress for stall_timeout: its sentinel brings the usual crash
        handling and resume."""
        beat, verdicts = self.liveness.turn(now, self.pool.procs.values())
        if beat:
            self.pool.beat()
        for v in verdicts:
            proc = self.pool.procs[v.wid]
            why = (f"sent nothing for {v.silent_for:.1f} s" if v.silent_for else
                   f"made no progress on its request for {v.stalled_for:.1f} s (stall_timeout)")
            logger.warning("worker {} (pid {}, model '{}') {}; killing it", proc.wid, proc.pid, proc.model, why)
            proc.signal(signal.SIGKILL)

    # ---- clients -------------------------------------------------------------------------------

    def _read_clients(self) -> None:
        limit = self.config.supervisor.max_message_bytes
        for _ in range(_RECV_BATCH):
            frames = self.frontend.recv()
            if frames is None:
                return
            client = frames[0]
            if len(frames) != 2:
                self.send(client, m.error(None, ErrorCode.BAD_REQUEST,
                                          f"a message must be exactly one frame, not {len(frames) - 1}"))
                continue
            msg: Message = {}
            try:
                msg = decode(frames[1], limit)
                self.handle_request(client, parse_request(msg), time.monotonic())
            except StokerError as exc:
                rid = exc.request_id
                if rid is None and len(frames[1]) > limit:
                    # Which request was too big, so that its sender can tell; MAXMSGSIZE (twice
                    # the limit) bounds what this decodes. An id in flight would read as that
                    # request's end: the error stays anonymous then.
                    rid = request_id_of_frame(frames[1], 2 * limit)
                    rid = None if (client, rid) in self.requests or (client, rid) in self.ops else rid
                self.send(client, m.error(rid, exc.code, exc.message))
            except Exception:  # a bug must cost one request, not the daemon and everyone's work
                logger.exception("internal error while handling a request")
                self._abandon(client, request_id_of(msg), time.monotonic())

    def handle_request(self, client: ClientId, req: Request, now: float) -> None:
        """Answer one valid request (or start the work that will answer it)."""
        key = (client, req.id)
        if key in self.requests or key in self.ops:
            # id null: an error with the id would read as the running request's terminal reply.
            raise BadRequest(f"id {req.id!r} is already in use by one of your requests in flight; "
                             "use a new id for each request", None)
        if self.stopping and req.op in _WORK_OPS:
            raise ShuttingDown("the supervisor is shutting down and takes no new work", req.id)
        if isinstance(req, GenerateRequest):
            self._generate(client, req, now)
        elif isinstance(req, CancelRequest):
            found, actions = self.requests.cancel((client, req.target), now)
            self._run(actions, now)  # the target's end comes before the cancel's result
            self.send(client, m.result(req.id, results.cancelled(found)))
        elif isinstance(req, ModelRequest):
            check_model(self.config, req.model, req.id)
            key = self.ops.add(client, req.id, req.op, req.model, req.pin)
            if req.op is Op.LOAD:
                self._admit(key, now)
            else:
                self._execute(self.scheduler.unload(key, req.model, now), now)
        elif req.op is Op.PING:
            self.send(client, m.result(req.id, results.pong(__version__, self.requests.instance,
                                                             self.requests.session_of(client),
                                                             self.config.supervisor.max_message_bytes)))
        elif req.op is Op.STATUS:
            self.send(client, m.result(req.id, status_data(
                self.config, self.scheduler, self.pool.procs, self.gpu_watch.snapshot, self.vram.available,
                now - self.started, self.stopping, now)))
        elif req.op is Op.MODELS:
            # Answered once every model's file has been looked at (or its look ran out of time).
            for name in self.config.models:
                self.costs.cost(name, now)
            if self.costs.looking():
                self.models_waiters.append((client, req.id))
            else:
                self.send(client, m.result(req.id, models_data(self.config, self.scheduler, self.costs, now)))
        elif req.op is Op.SHUTDOWN:
            self.send(client, m.result(req.id, results.stopping()))
            self.begin_shutdown(now)

    def _generate(self, client: ClientId, req: GenerateRequest, now: float) -> None:
        model = req.model or self.config.supervisor.default_model
        check_model(self.config, model, req.id)
        sup = self.config.supervisor
        max_tokens = min(req.sampling.get(Key.MAX_TOKENS, sup.default_max_tokens), sup.max_tokens_limit)
        key = self.requests.accept(client, req, model, max_tokens, now).key
        self._admit(key, now)
        self._run(self.requests.acknowledge(key), now)

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
            job = Job(key, model, keep_alive=r.keep_alive, client=key[0], priority=r.priority)
            self._execute(self.scheduler.submit(job, now), now)
        else:
            self._execute(self.scheduler.load(key, model, now, pin=op.pin), now)  # type: ignore[union-attr]

    def _abandon(self, client: ClientId, rid: Any, now: float) -> None:
        """Answer a request whose handling raised with `internal`, ending what it started."""
        key = (client, rid)
        message = "internal error in the supervisor; see its log"
        if key in self.requests:
            self._run(self.requests.abandon(key, ErrorCode.INTERNAL, message, now), now)
        elif key in self.ops:
            self._fail(key, ErrorCode.INTERNAL, message, now)
        else:
            self.send(client, m.error(rid, ErrorCode.INTERNAL, message))

    def send(self, client: ClientId, msg: Message) -> None:
        """Reply to a client; see Frontend for how nothing is dropped (and how a client that
        never reads is). A client found gone is dealt with between steps, not in the middle of one."""
        if self.frontend.send(client, msg) is Delivery.GONE:
            self.gone.add(client)

    def _drop_gone(self) -> None:
        """Clients that disconnected: their replies have nowhere to go, so stop spending work on them."""
        while self.gone:
            client = self.gone.pop()
            now = time.monotonic()
            ops = self.ops.client_gone(client)
            actions = self.requests.client_gone(client, now)
            if ops or actions:
                logger.info("client {} disconnected; cancelling its requests", client.hex())
            self.frontend.forget(client)
            self._run(actions, now)

    def _fail(self, key: RequestKey, code: ErrorCode, message: str, now: float) -> None:
        if key in self.requests:
            self._run(self.requests.fail(key, code, message, now), now)
        else:
            reply = self.ops.fail(key, code, message)
            if reply is not None:
                self.send(*reply)

    # ---- workers -------------------------------------------------------------------------------

    def _read_workers(self) -> bool:
        """Handle a batch of the worker socket's messages; True if none are left waiting."""
        now = time.monotonic()
        messages, drained = self.pool.read_socket(now)
        for proc, msg in messages:
            self._worker_message(proc, msg, now)
        return drained

    def _read_stream(self, proc: WorkerProcess) -> None:
        """Handle what a worker's generation stream holds. Tokens of one request read together
        reach its client as one frame (n > 1): they arrived together, so merging them delays
        nothing and saves a frame per token under load."""
        now = time.monotonic()
        try:
            for msg in self.pool.read_stream(proc, now):
                self._worker_message(proc, msg, now)
        finally:
            self._run(self.requests.flush(), now)

    def _worker_message(self, proc: WorkerProcess, msg: Message, now: float) -> None:
        try:
            self._worker_said(proc, _KINDS[msg[T]], msg, now)
        except Exception:  # an unknown kind, a missing key: a bad message, logged
            logger.exception("bad message from worker {}", proc.wid)

    def _worker_said(self, proc: WorkerProcess, kind: W, msg: Message, now: float) -> None:
        wid = proc.wid
        if kind is W.HELLO:
            proc.hello = True
            if msg.get(RSS):
                self.costs.overhead[self.config.models[proc.model].backend] = msg[RSS]
            self.scheduler.worker_hello(wid)
        elif kind is W.READY:
            proc.load_ms, proc.ready_at = msg[LOAD_MS], now
            logger.info("worker {} loaded '{}' in {} ms", wid, proc.model, msg[LOAD_MS])
            self.metrics.worker_loaded(proc.model, msg[LOAD_MS] / 1000)
            self._execute(self.scheduler.worker_ready(wid, now), now)
        elif kind is W.LOAD_FAILED:
            logger.warning("worker {} could not load '{}': {}", wid, proc.model, msg[Key.MESSAGE])
            self.scheduler.worker_load_failed(wid, msg[Key.MESSAGE])
        else:
            req = self.requests.on_worker(msg[RID], wid)
            if req is None:
                return  # late: the request was answered, or re-run elsewhere after a crash
            if kind is W.TOKEN:
                self.requests.tokens(req, msg[Key.TEXT], msg[Key.N], now)
                return
            if kind is W.END:
                self._run(self.requests.ended(req, Reason(msg[Key.REASON]), msg[Key.PROMPT_TOKENS], now), now)
            elif kind is W.ERROR:
                self._run(self.requests.fail(req.key, ErrorCode(msg[Key.CODE]), msg[Key.MESSAGE], now), now)
            self._execute(self.scheduler.job_done(wid, now, req.key), now)
            slot = self.scheduler.workers.get(wid)
            if slot is None or not slot.jobs:
                proc.progress_at = None  # it runs nothing: no progress expected

    def _worker_exited(self, proc: WorkerProcess, now: float) -> None:
        detail = self.pool.reap(proc)
        self.frontend.worker_count(len(self.pool))
        logger.log("INFO" if proc.asked_to_stop else "WARNING", "worker {} (pid {}, model '{}') {}", proc.wid,
                   proc.pid, proc.model, detail)
        if not proc.asked_to_stop:
            self.metrics.worker_crashed(proc.model)
        # What it was told to stop ends with it; what it ran waits to resume.
        ended = self.requests.cancelling_on(proc.wid)
        self._run(self.requests.worker_exited(proc.wid, now), now)
        self._execute(self.scheduler.worker_exited(proc.wid, now, detail, ended), now)

    # ---- actions -------------------------------------------------------------------------------

    def _execute(self, actions: list[Action], now: float) -> None:
        """Carry out the scheduler's actions."""
        for action in actions:
            if isinstance(action, StartWorker):
                self._start_worker(action, now)
            elif isinstance(action, StopWorker):
                self._stop_worker(action, now)
            elif isinstance(action, Dispatch):
                load_ms = self.pool.procs[action.wid].load_ms
                self._run(self.requests.dispatched(action.key, action.wid, now, load_ms), now)
            elif isinstance(action, FailJob):
                self._fail(action.key, action.code, action.message, now)
            elif isinstance(action, Notify):
                self._run(self.requests.notify(action.key, action.loading, action.position), now)
            elif isinstance(action, Answer):
                reply = self.ops.answered(action.key)
                if reply is not None:
                    self.send(*reply)

    def _run(self, actions: list[RequestAction], now: float) -> None:
        """Carry out the request machine's actions."""
        for action in actions:
            if isinstance(action, Reply):
                self.send(action.client, action.message)
            elif isinstance(action, RunOnWorker):
                self._run_on_worker(action, now)
            elif isinstance(action, CancelOnWorker):
                self.pool.send(action.wid, W.CANCEL, rid=action.job_no)
            elif isinstance(action, Unqueue):
                if not self.costs.unhold(action.key):
                    self.scheduler.cancel_queued(action.key)
            elif isinstance(action, Forget):
                request_ended(self.metrics, action, now)

    def _run_on_worker(self, action: RunOnWorker, now: float) -> None:
        keys: dict[str, Any] = {RID: action.job_no, REQUEST: action.body}
        if action.resume is not None:
            keys[RESUME] = action.resume
            client, rid = action.key or (b"", None)
            logger.info("resuming request {!r} of client {} on worker {} after {} tokens", rid, client.hex(),
                        action.wid, action.tokens_sent)
        proc = self.pool.procs[action.wid]
        proc.progress_at = now
        if not self.pool.send(action.wid, W.GENERATE, **keys):
            # A worker that cannot take its job is broken: kill it, and the job is re-run
            # (resumed) on the replacement.
            proc.signal(signal.SIGKILL)

    def _start_worker(self, action: StartWorker, now: float) -> None:
        model = self.config.models[action.model]
        threads = threads_per_worker(model.n_threads, model.replicas, self.cores)
        try:
            proc = self.pool.start(action.wid, model, threads, now)
        except Exception as exc:  # any failure to spawn is this worker's failure, not the loop's
            logger.exception("could not start a worker for '{}'", action.model)
            self._execute(self.scheduler.worker_exited(action.wid, now, f"could not start: {exc}"), now)
            return
        self.frontend.worker_count(len(self.pool))
        self.metrics.worker_started(action.model)
        logger.info("started worker {} (pid {}) for '{}' ({} threads)", action.wid, proc.pid, action.model, threads)

    def _stop_worker(self, action: StopWorker, now: float) -> None:
        proc = self.pool.procs.get(action.wid)
        if proc is None:
            return
        if action.reason:
            logger.info("stopping worker {} ('{}'): {}", action.wid, proc.model, action.reason)
        if action.evicted:
            self.metrics.evicted(proc.model)
        self.pool.stop(action.wid, now, self.config.supervisor.stop_grace, action.force)

