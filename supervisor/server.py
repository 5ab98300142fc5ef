"""The supervisor's event loop: the one place that owns sockets, worker processes and timers.

It does I/O only: it polls, decodes what arrives (client frames, worker frames, process exits,
signals, timers), feeds it to the Core (core.py: the scheduler, the request machine, model ops
and costs, without I/O) and to Liveness, and carries out the actions they return.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from loguru import logger

from stoker.protocol import messages as m
from stoker.protocol.codec import decode
from stoker.protocol.errors import StokerError
from stoker.protocol.messages import ErrorCode, Key, Message, Reason
from stoker.protocol.validation import parse_request, request_id_of, request_id_of_frame
from stoker.supervisor import __version__
from stoker.supervisor.config import Config
from stoker.supervisor.core import BeginShutdown, Core, Out, ReportStatus
from stoker.supervisor.frontend import Delivery, open_frontend
from stoker.supervisor.liveness import Liveness
from stoker.supervisor.memory import Cost
from stoker.supervisor.metrics import Metrics
from stoker.supervisor.model_files import ModelFiles
from stoker.supervisor.notify import Notifier
from stoker.supervisor.reports import request_ended, snapshot_metrics, status_data, status_line
from stoker.supervisor.gateway_child import GatewayChild
from stoker.supervisor.requests import CancelOnWorker, ClientId, Forget, Reply, RunOnWorker
from stoker.supervisor.resources import probe_memory, threads_per_worker, usable_cores
from stoker.supervisor.scheduler import StartWorker, StopWorker
from stoker.supervisor.wakeup import Wakeup
from stoker.supervisor.worker_pool import RECV_BATCH, WorkerPool
from stoker.supervisor.worker_process import WorkerProcess, start_forkserver
from stoker.workers.wire import LOAD_MS, REQUEST, RESUME, RID, RSS, START, T, W

_RETRY_S = 0.005  # how soon to retry sending to a client whose pipe was full
_MEASURE_S = 1.0  # how often workers' real memory is read
_SLOW_CALL_S = 10.0  # the most a call into a driver (NVML) may take before it is given up on
_KINDS = {kind.value: kind for kind in W}  # W(value) costs an Enum call per token


@dataclass
class Supervisor:
    """The daemon: bind, serve until shut down, clean up."""

    config: Config
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        sup = self.config.supervisor
        self.wakeup = Wakeup()
        self.core = Core(self.config, ModelFiles(self.wakeup.wake, timeout=sup.file_timeout))
        self.liveness = Liveness(sup.worker_liveness, sup.stall_timeout, time.monotonic())
        self.cores = usable_cores()
        self.notifier = Notifier()
        self.metrics = Metrics()  # started in bind()
        self.next_measure = 0.0
        self.gone: set[ClientId] = set()  # clients found gone while sending, handled between steps
        self.drain_deadline: float | None = None
        self.log_dir = Path(sup.state_dir) / "workers"
        self.gateway = GatewayChild(self.config)

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
        self.core.scheduler.set_budget(budget)
        logger.info("memory budget: {}{}", budget.describe(Cost(budget.ram or 0, budget.vram or 0)),
                    "" if budget.vram is not None else " (no GPU: GPU memory is not budgeted)")

    def serve(self) -> int:
        """Run until shut down; returns the exit code."""
        self.bind()
        self.wakeup.catch_signals()
        self.frontend.settled()
        logger.info("stoker {} listening on {} (pid {})", __version__, self.config.supervisor.endpoint, os.getpid())
        self.notifier.ready(status_line(self.core.scheduler))
        self.gateway.start(time.monotonic())
        try:
            self._loop()
        finally:
            self.gateway.stop()
            self.notifier.close()
            self.wakeup.close()
            self._close()
        logger.info("stoker stopped")
        return 0

    def _loop(self) -> None:
        for sock in (self.frontend.socket, self.frontend.monitor, *self.wakeup.fds):
            self.poller.register(sock, zmq.POLLIN)
        while not (self.core.stopping and not self.pool):
            ready = dict(self.poller.poll(self._poll_timeout_ms()))
            now = time.monotonic()
            for signum in self.wakeup.signals(ready):
                logger.info("received {}; shutting down", signum.name)
                self.begin_shutdown(now)
            if self.wakeup.background_done(ready):
                self._do(self.core.files_looked(now), now)
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
        deadlines = [self.core.next_deadline(), self.drain_deadline, self.next_measure,
                     self.notifier.next_watchdog, self.gateway.next_deadline(), *self.pool.deadlines()]
        if self.pool:
            deadlines.append(self.liveness.next_beat)
        due = min((d for d in deadlines if d is not None), default=None)
        timeout = 1.0 if due is None else max(0.0, due - time.monotonic())
        if self.frontend.pending:
            timeout = min(timeout, _RETRY_S)
        return int(timeout * 1000) + 1

    def begin_shutdown(self, now: float) -> None:
        """Stop taking work, let running requests finish within the grace, then stop the workers.
        A second signal skips the grace."""
        if self.core.stopping:
            self.drain_deadline = now
            return
        self.notifier.stopping()
        self.drain_deadline = now + self.config.supervisor.drain_timeout
        self._do(self.core.begin_shutdown(now), now)

    def _close(self) -> None:
        self.frontend.close(retry_s=_RETRY_S)
        self.gpu_watch.stop()
        self.metrics.close()
        self.pool.close()
        self.ctx.term()
        shutil.rmtree(self.private_dir, ignore_errors=True)

    def _timers(self, now: float) -> None:
        self._do(self.core.tick(now), now)
        self.gateway.tick(now, self.core.stopping)
        beat, verdicts = self.liveness.turn(now, self.pool.procs.values())
        if beat:
            self.pool.beat()
        for v in verdicts:  # hung or stopped, or stalled: its sentinel brings crash handling and resume
            proc = self.pool.procs[v.wid]
            why = (f"sent nothing for {v.silent_for:.1f} s" if v.silent_for else
                   f"made no progress on its request for {v.stalled_for:.1f} s (stall_timeout)")
            logger.warning("worker {} (pid {}, model '{}') {}; killing it", proc.wid, proc.pid, proc.model, why)
            proc.signal(signal.SIGKILL)
        if now >= self.next_measure:
            self.next_measure = now + _MEASURE_S
            self._do(self.core.measured(self.pool.measured(self.core.scheduler, self.gpu_watch), now), now)
            snapshot_metrics(self.metrics, self.config, self.core.scheduler)
            if not self.core.stopping:
                self.notifier.status(status_line(self.core.scheduler))
        self.notifier.watchdog_due(now)  # from this loop: systemd restarts one whose loop is wedged
        grace = self.config.supervisor.stop_grace
        if self.drain_deadline is not None and now >= self.drain_deadline:
            self.drain_deadline = None
            self._do(self.core.drain_over(now), now)
            self.pool.terminate_all(now, grace)
        self.pool.escalate(now, grace)

    # ---- clients -------------------------------------------------------------------------------

    def _read_clients(self) -> None:
        limit = self.config.supervisor.max_message_bytes
        for _ in range(RECV_BATCH):
            frames = self.frontend.recv()
            if frames is None:
                return
            client = frames[0]
            if len(frames) != 2:
                self.send(client, m.error(None, ErrorCode.BAD_REQUEST,
                                          f"a message must be exactly one frame, not {len(frames) - 1}"))
                continue
            msg: Message = {}
            now = time.monotonic()
            try:
                msg = decode(frames[1], limit)
                self._do(self.core.request(client, parse_request(msg), now), now)
            except StokerError as exc:
                rid = exc.request_id
                if rid is None and len(frames[1]) > limit:
                    # Which request was too big, so that its sender can tell; MAXMSGSIZE (twice
                    # the limit) bounds what this decodes. An id in flight would read as that
                    # request's end: the error stays anonymous then.
                    rid = request_id_of_frame(frames[1], 2 * limit)
                    rid = None if self.core.id_in_flight(client, rid) else rid
                self.send(client, m.error(rid, exc.code, exc.message))
            except Exception:  # a bug must cost one request, not the daemon and everyone's work
                logger.exception("internal error while handling a request")
                self._do(self.core.internal_error(client, request_id_of(msg), now), now)

    def send(self, client: ClientId, msg: Message) -> None:
        """Reply to a client; see Frontend for how nothing is dropped (and how a client that
        never reads is). A client found gone is dealt with between steps, not in the middle of one."""
        if client in self.gone:
            return  # found gone earlier in this step: nothing more reaches it (no end after a gap)
        if self.frontend.send(client, msg) is Delivery.GONE:
            self.gone.add(client)

    def _drop_gone(self) -> None:
        while self.gone:
            client = self.gone.pop()
            if self.core.has_work_of(client):
                logger.info("client {} disconnected; cancelling its requests", client.hex())
            self.frontend.forget(client)
            now = time.monotonic()
            self._do(self.core.client_gone(client, now), now)

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
            self._do(self.core.flush(now), now)

    def _worker_message(self, proc: WorkerProcess, msg: Message, now: float) -> None:
        try:
            kind, wid = _KINDS[msg[T]], proc.wid
            if kind is W.TOKEN:
                self.core.tokens(wid, msg[RID], msg[Key.TEXT], msg[Key.N], now, msg.get(Key.LOGPROBS))
            elif kind is W.VECTORS:
                self.core.vectors(wid, msg[RID], msg[START], msg[Key.EMBEDDINGS], msg[Key.TOKENS], now)
            elif kind in (W.END, W.ERROR):
                error = (ErrorCode(msg[Key.CODE]), msg[Key.MESSAGE]) if kind is W.ERROR else None
                reason = Reason(msg[Key.REASON]) if kind is W.END else None
                self._do(self.core.job_ended(wid, msg[RID], now, reason, msg.get(Key.PROMPT_TOKENS, 0), error), now)
                if self.core.runs_nothing(wid):
                    proc.progress_at = None  # no progress expected
            elif kind is W.HELLO:
                proc.hello = True
                self.core.worker_hello(wid, proc.model, msg.get(RSS))
            elif kind is W.READY:
                proc.load_ms, proc.ready_at = msg[LOAD_MS], now
                logger.info("worker {} loaded '{}' in {} ms", wid, proc.model, msg[LOAD_MS])
                self.metrics.worker_loaded(proc.model, msg[LOAD_MS] / 1000)
                self._do(self.core.worker_ready(wid, msg[LOAD_MS], now), now)
            elif kind is W.LOAD_FAILED:
                logger.warning("worker {} could not load '{}': {}", wid, proc.model, msg[Key.MESSAGE])
                self.core.worker_load_failed(wid, msg[Key.MESSAGE])
        except Exception:  # an unknown kind, a missing key: a bad message, logged
            logger.exception("bad message from worker {}", proc.wid)
            self._do(self.core.take(), now)  # what was decided before it raised still happens

    def _worker_exited(self, proc: WorkerProcess, now: float) -> None:
        detail = self.pool.reap(proc)
        logger.log("INFO" if proc.asked_to_stop else "WARNING", "worker {} (pid {}, model '{}') {}", proc.wid,
                   proc.pid, proc.model, detail)
        if not proc.asked_to_stop:
            self.metrics.worker_crashed(proc.model)
        self._do(self.core.worker_exited(proc.wid, now, detail), now)

    # ---- actions -------------------------------------------------------------------------------

    def _do(self, actions: list[Out], now: float) -> None:
        """Carry out what the core decided."""
        for action in actions:
            if isinstance(action, Reply):
                self.send(action.client, action.message)
            elif isinstance(action, RunOnWorker):
                self._run_on_worker(action, now)
            elif isinstance(action, CancelOnWorker):
                self.pool.send(action.wid, W.CANCEL, rid=action.job_no)
            elif isinstance(action, Forget):
                request_ended(self.metrics, action, now)
            elif isinstance(action, StartWorker):
                self._start_worker(action, now)
            elif isinstance(action, StopWorker):
                self._stop_worker(action, now)
            elif isinstance(action, ReportStatus):
                data = status_data(self.config, self.core.scheduler, self.pool.procs, self.gpu_watch.snapshot,
                                   self.vram.available, now - self.started, self.core.stopping, now)
                self.send(action.client, m.result(action.rid, data))
            elif isinstance(action, BeginShutdown):
                self.begin_shutdown(now)

    def _run_on_worker(self, action: RunOnWorker, now: float) -> None:
        keys = {RID: action.job_no, REQUEST: action.body}
        if action.resume is not None:
            keys[RESUME] = action.resume
            client, rid = action.key or (b"", None)
            logger.info("resuming request {!r} of client {} on worker {} after {} tokens", rid, client.hex(),
                        action.wid, action.tokens_sent)
        proc = self.pool.procs[action.wid]
        proc.progress_at = now
        if not self.pool.send(action.wid, W.EMBED if action.embed else W.GENERATE, **keys):
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
            self._do(self.core.worker_exited(action.wid, now, f"could not start: {exc}"), now)
            return
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
