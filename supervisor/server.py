"""The supervisor's event loop: the one place that owns sockets, worker processes and timers.

It turns what arrives (client frames, worker frames, process exits, signals, deadlines) into
calls on the Scheduler, and carries out the actions the Scheduler returns.
"""

from __future__ import annotations

import heapq
import os
import secrets
import shutil
import signal
import socket
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import zmq
from loguru import logger

from stoker.protocol import messages as m
from stoker.protocol.codec import decode, encode
from stoker.protocol.errors import StokerError
from stoker.protocol.endpoint import is_loopback
from stoker.protocol.messages import ErrorCode, InfoState, Key, Message, Reason
from stoker.protocol.validation import parse_request, request_id_of
from stoker.protocol.worker_wire import (
    HEARTBEAT_SUFFIX, LOAD_MS, MAX_WORKER_FRAME_BYTES, PROGRESS, REQUEST, RESUME, RID, RSS, T, W, wmsg,
)
from stoker.supervisor import __version__
from stoker.supervisor.config import Config
from stoker.supervisor.inflight import ActiveRequest, Key_, PendingOp
from stoker.supervisor.ops import OpsMixin
from stoker.supervisor.curve import CurveServer
from stoker.supervisor.fd_limits import raise_nofile_limit
from stoker.supervisor.frontend import Delivery, Frontend, OutboxLimit
from stoker.supervisor.outbox import ClientId
from stoker.supervisor.memory import Cost, estimate, needs_file
from stoker.supervisor.model_files import ModelFiles
from stoker.supervisor.metrics import Metrics
from stoker.supervisor.notify import Notifier
from stoker.supervisor.sizes import format_size
from stoker.supervisor.resources import (
    GpuMemoryWatch, VramProbe, call_with_timeout, resolve_budget, rss_bytes, threads_per_worker, usable_cores,
)
from stoker.supervisor.restart_policy import RestartPolicy, RestartSettings
from stoker.supervisor.scheduler import (
    Action, Answer, Dispatch, FailJob, ModelLimits, Notify, Scheduler, SchedulerSettings, StartWorker, StopWorker,
)
from stoker.supervisor.states import WorkerState
from stoker.workers.demo_model import demo_size_bytes
from stoker.supervisor.worker_process import WorkerProcess, start_forkserver

_RETRY_S = 0.005  # how soon to retry sending to a client whose pipe was full
_RECV_BATCH = 200  # frames read from one socket before looking at the others
# A new worker process is silent until it has imported what it needs and started its heartbeat.
_STARTUP_S = 15.0
_MEASURE_S = 1.0  # how often workers' real memory is read
_SLOW_CALL_S = 10.0  # the most a call into a driver (NVML) may take before it is given up on
_KINDS = {kind.value: kind for kind in W}  # W(value) costs an Enum call per token


@dataclass
class Supervisor(OpsMixin):
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
        # A new id every start: clients tell from it that the supervisor that had their requests
        # is gone (see protocol/README.md, "Restarts").
        self.instance = secrets.token_hex(8)
        self.overhead: dict[str, int] = {}  # per backend: a worker's RSS before its model, as measured
        self.estimate_warned: set[str] = set()
        self._bg_r, self._bg_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # background work done: wake the loop
        self.files = ModelFiles(self._wake_loop, timeout=sup.file_timeout)
        # Work waiting for a first look at its model's file: generate keys, load and models ops.
        self.file_waiters: dict[str, list[Key_]] = defaultdict(list)
        self.models_waiters: list[tuple[ClientId, Any]] = []
        self.deadlines: list[tuple[float, int, Key_]] = []  # (when, job_no, key): requests' own deadlines
        self.cores = usable_cores()
        self.next_measure = 0.0
        self.notifier = Notifier()
        self.next_watchdog = 0.0
        self.metrics = Metrics()  # started in bind()
        self.requests: dict[Key_, ActiveRequest] = {}
        self.unflushed: set[Key_] = set()  # requests with tokens read but not yet sent
        self.by_job: dict[int, Key_] = {}
        self.pending_ops: dict[Key_, PendingOp] = {}
        self.procs: dict[str, WorkerProcess] = {}
        self.sentinels: dict[int, WorkerProcess] = {}  # each live worker's sentinel fd, for the loop
        self.streams: dict[int, WorkerProcess] = {}  # each live worker's generation stream (read end)
        self.stopping = False
        self.drain_deadline: float | None = None
        self._job_seq = 0
        self.log_dir = Path(sup.state_dir) / "workers"
        self.beat_interval = sup.worker_liveness / 3
        self.next_beat = 0.0
        self.last_turn = time.monotonic()

    # ---- lifecycle -----------------------------------------------------------------------------

    def bind(self) -> None:
        """Bind the frontend (clients) and backend (workers) sockets, and the metrics endpoint."""
        self.metrics = Metrics(self.config.supervisor.metrics)  # first: it may fail, holding nothing yet
        if self.metrics.enabled:
            logger.info("metrics at http://{}/metrics", self.config.supervisor.metrics)
        self.ctx = zmq.Context()
        sup = self.config.supervisor
        before, after = raise_nofile_limit()
        curve = CurveServer(self.ctx, sup.curve_server_key, sup.curve_authorized_keys) if sup.curve_server_key else None
        worker_slots = min(64, sum(mc.replicas for mc in self.config.models.values()) + 1)
        self.frontend = Frontend(self.ctx, sup.endpoint, sup.max_message_bytes, sup.socket_mode,
                                 OutboxLimit(sup.max_outbox_bytes, sup.max_outbox_messages), curve,
                                 sup.max_clients, worker_slots)
        limit = self.frontend.client_limit
        logger.info("file descriptors: limit {}{}; up to {} clients at once", after,
                    f" (raised from {before})" if after != before else "", limit.max_clients)
        if after < 4096:
            logger.warning("the file-descriptor limit is only {}: set LimitNOFILE (systemd) or ulimit -n higher "
                           "to serve more clients", after)
        if curve is not None:
            logger.info("CurveZMQ: clients need a key in {}", sup.curve_authorized_keys)
        elif sup.endpoint.startswith("tcp://"):
            logger.warning("{} has no authentication: any user or program that can reach it can run models and "
                           "stop the supervisor{}", sup.endpoint,
                           "" if is_loopback(sup.endpoint) else " (allow_insecure_tcp is set)")
        if sup.endpoint.startswith("tcp://") and sup.max_clients:
            logger.warning("max_clients is enforced on ipc:// endpoints only")
        self.private_dir = Path(tempfile.mkdtemp(prefix="stoker-"))
        self.backend_endpoint = f"ipc://{self.private_dir / 'workers.sock'}"
        self.backend = self.ctx.socket(zmq.ROUTER)
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.backend.setsockopt(zmq.LINGER, 0)
        self.backend.bind(self.backend_endpoint)
        # Initialising NVML can take a while, and a wedged driver can block it for ever: now,
        # on a thread with a time limit, and from then on only off the loop (GpuMemoryWatch).
        self.vram, ok = call_with_timeout(VramProbe, _SLOW_CALL_S, None)
        if self.vram is None:
            logger.warning("NVML did not answer within {:g} s; GPU memory is not measured or budgeted", _SLOW_CALL_S)
            self.vram = VramProbe(enabled=False)
        self.gpu_watch = GpuMemoryWatch(self.vram, _MEASURE_S)
        if self.vram.available:
            self.gpu_watch.start()
        start_forkserver(gpu=any(mc.n_gpu_layers for mc in self.config.models.values()))
        budget, ok = call_with_timeout(lambda: resolve_budget(self.config.supervisor, self.vram), _SLOW_CALL_S, None)
        if budget is None:
            logger.warning("measuring free memory did not finish within {:g} s; GPU memory is not budgeted",
                           _SLOW_CALL_S)
            budget = resolve_budget(self.config.supervisor, VramProbe(enabled=False))
        self.scheduler.settings = replace(self.scheduler.settings, budget=budget)
        logger.info("memory budget: {}{}", budget.describe(Cost(budget.ram or 0, budget.vram or 0)),
                    "" if budget.vram is not None else " (no GPU: GPU memory is not budgeted)")

    def serve(self) -> int:
        """Run until shut down; returns the exit code."""
        self.bind()
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        # The handlers do nothing: the wakeup fd carries the signal number into the poll loop.
        stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # HUP: its terminal closed
        old_handlers = {s: signal.signal(s, lambda *_: None) for s in stop_signals}
        logger.info("stoker {} listening on {} (pid {})", __version__, self.config.supervisor.endpoint, os.getpid())
        self.notifier.ready(self.status_line())
        try:
            self._loop(wake_r)
        finally:
            self.notifier.close()
            signal.set_wakeup_fd(old_wakeup)
            for s, h in old_handlers.items():
                signal.signal(s, h)
            wake_r.close()
            wake_w.close()
            self._close()
        logger.info("stoker stopped")
        return 0

    def _loop(self, wake: socket.socket) -> None:
        poller = zmq.Poller()
        poller.register(self.frontend.socket, zmq.POLLIN)
        poller.register(self.frontend.monitor, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        poller.register(wake.fileno(), zmq.POLLIN)
        poller.register(self._bg_r, zmq.POLLIN)
        self.poller = poller
        while not (self.stopping and not self.procs):
            ready = dict(poller.poll(self._poll_timeout_ms()))
            now = time.monotonic()
            if wake.fileno() in ready:
                for signum in wake.recv(64):
                    logger.info("received {}; shutting down", signal.Signals(signum).name)
                    self.begin_shutdown(now)
            if self._bg_r in ready:
                self._drain_wake_pipe()
                self._files_checked(now)
            drained = self._read_workers() if self.backend in ready else True
            for fd in ready:
                if fd in self.streams:
                    self._read_stream(self.streams[fd])
            dead = [self.sentinels[fd] for fd in ready if fd in self.sentinels]
            if dead and (drained or self._read_workers()):
                # Everything it sent before dying comes first. If the socket is not drained yet
                # (many workers starting at once), the sentinel is still readable next time round.
                # Its stream holds all it wrote, since it can write no more.
                for proc in dead:
                    self._read_stream(proc)
                    self._worker_exited(proc, time.monotonic())
            for client in self.frontend.disconnected():  # before reading: see Frontend.disconnected
                self._client_gone(client)
            if self.frontend.socket in ready:
                self._read_clients()
                for client in self.frontend.disconnected():  # seen while reading
                    self._client_gone(client)
            self._timers(time.monotonic())
            for client in self.frontend.flush():
                self._client_gone(client)

    def _wake_loop(self) -> None:
        """Called from background threads: wake the loop to collect what they found."""
        try:
            os.write(self._bg_w, b"x")
        except BlockingIOError:  # already full: the loop will wake anyway
            pass

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._bg_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _poll_timeout_ms(self) -> int:
        deadlines = [self.scheduler.next_deadline(), self.drain_deadline, self.next_measure,
                     self.files.next_deadline(), self.deadlines[0][0] if self.deadlines else None]
        if self.notifier.watchdog_s is not None:
            deadlines.append(self.next_watchdog)
        if self.procs:
            deadlines.append(self.next_beat)
        for p in self.procs.values():
            deadlines += [p.term_at, p.kill_at]
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
        waiting = [key for keys in self.file_waiters.values() for key in keys]
        self.file_waiters.clear()
        for key in waiting:
            self._fail(key, ErrorCode.SHUTTING_DOWN, "the supervisor is shutting down; retry once it is running again")

    def _deadline_passed(self, key: Key_, req: ActiveRequest) -> None:
        """The request's own `deadline` passed: it ends with `timeout`, wherever it stands."""
        message = (f"the request did not finish within its deadline of {req.request.deadline:g} s "
                   f"({req.seq} tokens sent)")
        if self.drop_queued(key):
            self._fail(key, ErrorCode.TIMEOUT, message)
            return
        self._flush_tokens(key)
        if not req.client_gone:
            self.send(req.client, m.error(req.request.id, ErrorCode.TIMEOUT, message))
        # Its worker's late replies must not follow the error; the worker is told to stop.
        req.client_gone = True
        req.outcome = ErrorCode.TIMEOUT.value
        self.cancel_running(req)

    def _close(self) -> None:
        self.frontend.close(retry_s=_RETRY_S)
        self.gpu_watch.stop()
        self.metrics.close()
        os.close(self._bg_r)
        os.close(self._bg_w)
        self.backend.close()
        self.ctx.term()
        shutil.rmtree(self.private_dir, ignore_errors=True)

    # ---- timers --------------------------------------------------------------------------------

    def _timers(self, now: float) -> None:
        self._execute(self.scheduler.tick(now), now)
        self._heartbeats(now)
        due = self.files.next_deadline()
        if due is not None and now >= due:
            self._files_checked(now)
        while self.deadlines and self.deadlines[0][0] <= now:
            _, job_no, key = heapq.heappop(self.deadlines)
            req = self.requests.get(key)
            if req is not None and req.job_no == job_no:
                self._deadline_passed(key, req)
        if now >= self.next_measure:
            self.next_measure = now + _MEASURE_S
            self._measure(now)
            self._snapshot_metrics()
            if not self.stopping:
                self.notifier.status(self.status_line())
        if self.notifier.watchdog_s is not None and now >= self.next_watchdog:
            # From this loop, so that systemd restarts a supervisor whose loop is wedged.
            self.next_watchdog = now + self.notifier.watchdog_s
            self.notifier.watchdog()
        if self.drain_deadline is not None and now >= self.drain_deadline:
            self.drain_deadline = None
            for key in list(self.requests):
                self._fail(key, ErrorCode.SHUTTING_DOWN, "the supervisor shut down before this request finished")
            for proc in self.procs.values():
                if proc.kill_at is None:
                    proc.signal(signal.SIGTERM)
                    proc.term_at, proc.kill_at = None, now + self.config.supervisor.stop_grace
        for proc in self.procs.values():
            if proc.term_at is not None and now >= proc.term_at:
                proc.signal(signal.SIGTERM)
                proc.term_at, proc.kill_at = None, now + self.config.supervisor.stop_grace
            elif proc.kill_at is not None and now >= proc.kill_at:
                logger.warning("worker {} (pid {}) ignored SIGTERM; killing it", proc.wid, proc.pid)
                proc.signal(signal.SIGKILL)
                proc.kill_at = None

    def _measure(self, now: float) -> None:
        """Replace estimates with what loaded workers really hold."""
        watch = self.gpu_watch
        for wid, proc in list(self.procs.items()):
            slot = self.scheduler.workers.get(wid)
            if slot is not None and slot.state in (WorkerState.IDLE, WorkerState.BUSY):
                # NVML may not list a process (or not know its usage), and what it read before
                # the model was loaded is not what the worker holds: keep the GPU estimate then.
                fresh = proc.ready_at is not None and watch.taken_at > proc.ready_at
                vram = watch.snapshot.get(proc.pid, 0) if fresh else 0
                cost = Cost(rss_bytes(proc.pid), vram or slot.charge.vram)
                if cost.ram:  # 0: it exited a moment ago
                    self._execute(self.scheduler.worker_measured(wid, cost, now), now)

    def _snapshot_metrics(self) -> None:
        if not self.metrics.enabled:
            return
        sched = self.scheduler
        states = {s.value: 0 for s in WorkerState}
        for w in sched.workers.values():
            states[w.state.value] += 1
        budget, used = sched.settings.budget, sched.used()
        memory = {("ram", "used"): used.ram, ("vram", "used"): used.vram}
        if budget.ram is not None:
            memory[("ram", "budget")] = budget.ram
        if budget.vram is not None:
            memory[("vram", "budget")] = budget.vram
        self.metrics.snapshot(sched.queue_depths(), self.config.models, states, memory)

    def status_line(self) -> str:
        """One line for `systemctl status`: the workers, what waits, the memory held."""
        sched = self.scheduler
        workers = [f"{w.model} {w.state.value}" for w in sched.workers.values()]
        queued = sum(sched.queue_depths().values())
        budget, used = sched.settings.budget, sched.used()
        ram = f"RAM {format_size(used.ram)}" + (f" of {format_size(budget.ram)}" if budget.ram is not None else "")
        return (f"{len(workers)} worker{'s' if len(workers) != 1 else ''}"
                + (f" ({', '.join(workers)})" if workers else "") + f"; {queued} queued; {ram}")

    def model_cost(self, name: str, now: float) -> str | None:
        """Give the scheduler the model's cost before it places a worker: measured, or estimated
        from the model's file. Returns "" once it has one, None while the file is still being
        looked at (off this loop: see model_files), or why the model cannot load at all."""
        if name in self.scheduler.measured_models:
            return ""
        model = self.config.models[name]
        overhead = self.overhead.get(model.backend)
        facts = None
        if needs_file(model):
            facts = self.files.facts(name, model.path, now)
            if facts is None:
                return None
            if facts.unusable and not model.demo:  # the demo's file is written at its first load
                return facts.unusable
        if facts is not None and facts.gguf is None:
            # Count what its file holds, and its process, until a worker of it is measured; the
            # load says what is wrong with the file, if anything is.
            if facts.problem and not model.demo and name not in self.estimate_warned:
                self.estimate_warned.add(name)
                logger.warning("cannot estimate the memory of model '{}' ({}); counting its file and its "
                               "process until a worker of it is measured", name, facts.problem)
            cost = estimate(model, None, overhead, demo_size_bytes() if model.demo else facts.size)
        else:
            cost = estimate(model, facts.gguf if facts is not None else None, overhead)
        self.scheduler.costs[name] = cost
        return ""

    def _files_checked(self, now: float) -> None:
        """Looks at model files finished (or ran out of time): admit what waited for them."""
        for name, _facts in self.files.poll(now):
            for key in self.file_waiters.pop(name, []):
                self.admit(key, now)
        if self.models_waiters and not any(self.files.looking(n) for n in self.config.models):
            waiting, self.models_waiters = self.models_waiters, []
            for client, rid in waiting:
                self.send(client, m.result(rid, self.models_data(now)))

    def _heartbeats(self, now: float) -> None:
        """Beat to every worker; kill one that has been silent for the liveness window (it is
        hung or stopped), so that its sentinel brings the usual crash handling and resume."""
        stalled = now - self.last_turn > 1.5 * self.beat_interval  # it turns at least once per beat
        self.last_turn = now
        if stalled:
            # This loop itself was held up (a stopped process, an overloaded machine): the
            # workers' beats are waiting unread, so silence now proves nothing about them.
            for proc in self.procs.values():
                proc.last_heard = max(proc.last_heard, now)
                if proc.progress_at is not None:
                    proc.progress_at = max(proc.progress_at, now)
        if now >= self.next_beat:
            self.next_beat = now + self.beat_interval
            beat = encode(wmsg(W.HEARTBEAT))
            for wid in self.procs:
                try:
                    self.backend.send_multipart([(wid + HEARTBEAT_SUFFIX).encode(), beat], zmq.NOBLOCK)
                except zmq.ZMQError:  # not connected yet, or gone: its own silence decides
                    pass
        liveness, stall = self.config.supervisor.worker_liveness, self.config.supervisor.stall_timeout
        for proc in self.procs.values():
            if proc.hung_for is not None or proc.stalled_for is not None:
                continue  # killed already
            silent = now - proc.last_heard
            if silent > (liveness if proc.hello else max(liveness, _STARTUP_S)):
                logger.warning("worker {} (pid {}, model '{}') sent nothing for {:.1f} s; killing it",
                               proc.wid, proc.pid, proc.model, silent)
                proc.hung_for = silent
                proc.signal(signal.SIGKILL)
            elif proc.progress_at is not None and now - proc.progress_at > stall:
                # It beats (its heartbeat thread runs) but its request makes no progress: stuck in
                # a native call that released the GIL. Killed, its request resumes elsewhere.
                proc.stalled_for = now - proc.progress_at
                logger.warning("worker {} (pid {}, model '{}') made no progress on its request for {:.1f} s "
                               "(stall_timeout); killing it", proc.wid, proc.pid, proc.model, proc.stalled_for)
                proc.signal(signal.SIGKILL)

    # ---- clients -------------------------------------------------------------------------------

    def _read_clients(self) -> None:
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
                msg = decode(frames[1], self.config.supervisor.max_message_bytes)
                self.handle_request(client, parse_request(msg), time.monotonic())
            except StokerError as exc:
                rid = exc.request_id
                if rid is None and len(frames[1]) > self.config.supervisor.max_message_bytes:
                    rid = self._id_of_oversize(client, frames[1])
                self.send(client, m.error(rid, exc.code, exc.message))
            except Exception:  # a bug must cost one request, not the daemon and everyone's work
                logger.exception("internal error while handling a request")
                key = (client, request_id_of(msg))
                if key in self.requests or key in self.pending_ops:
                    key = (client, None)  # the id belongs to a healthy request: leave it alone
                self._abandon(*key)

    def _id_of_oversize(self, client: ClientId, frame: bytes) -> Any:
        """The id of a request refused for its size, so that its sender can tell which one it
        was. ZeroMQ's MAXMSGSIZE (twice the limit) bounds what this decodes."""
        try:
            rid = request_id_of(decode(frame, 2 * self.config.supervisor.max_message_bytes))
        except Exception:
            return None
        # An id in flight would read as that request's end: leave the error anonymous then.
        return None if (client, rid) in self.requests or (client, rid) in self.pending_ops else rid

    def _abandon(self, client: ClientId, rid: Any) -> None:
        """Answer a request whose handling raised with `internal`, and forget whatever it left.
        Only called for state the failing message itself created."""
        key = (client, rid)
        message = "internal error in the supervisor; see its log"
        if key in self.requests:
            req = self.requests[key]
            if not self.drop_queued(key):
                self.cancel_running(req)
                req.client_gone = True  # its worker's late replies must not follow this error
                self.send(client, m.error(rid, ErrorCode.INTERNAL, message))
                return
            self._fail(key, ErrorCode.INTERNAL, message)
        elif key in self.pending_ops:
            self._fail(key, ErrorCode.INTERNAL, message)
        else:
            self.send(client, m.error(rid, ErrorCode.INTERNAL, message))

    def send(self, client: ClientId, msg: Message) -> None:
        """Reply to a client; see Frontend for how nothing is dropped (and how a client that
        never reads is)."""
        if self.frontend.send(client, msg) is Delivery.GONE:
            self._client_gone(client)

    def _client_gone(self, client: ClientId) -> None:
        """The client disconnected: its replies have nowhere to go, so stop spending work on them."""
        if any(k[0] == client for k in self.pending_ops) or any(r.client == client for r in self.requests.values()):
            logger.info("client {} disconnected; cancelling its requests", client.hex())
        self.frontend.forget(client)
        for key in [k for k in self.pending_ops if k[0] == client]:
            del self.pending_ops[key]
        for key, req in list(self.requests.items()):
            if req.client != client:
                continue
            req.client_gone = True
            if self.drop_queued(key):
                self._forget(key, "client_gone")
            else:
                self.cancel_running(req)

    def cancel_running(self, req: ActiveRequest) -> None:
        """Ask the request's worker to stop it (once per worker); it answers with an `end`
        (cancelled). If the job is re-run after a crash, the new worker is told too."""
        req.cancelled = True
        if req.worker is not None and not req.cancel_sent:
            req.cancel_sent = True
            self._to_worker(req.worker, W.CANCEL, rid=req.job_no)

    # ---- workers -------------------------------------------------------------------------------

    def _read_workers(self) -> bool:
        """Handle up to a batch of frames from the worker socket (hello, ready, load failures,
        heartbeats); True if none are left waiting. Tokens come on the streams instead."""
        for _ in range(_RECV_BATCH):
            try:
                # Asking first is cheaper than the exception an empty socket raises.
                if not self.backend.get(zmq.EVENTS) & zmq.POLLIN:
                    return True
                wid_b, frame = self.backend.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            wid = wid_b.decode(errors="replace")
            heartbeat = wid.endswith(HEARTBEAT_SUFFIX)
            if heartbeat:
                wid = wid[: -len(HEARTBEAT_SUFFIX)]
            proc = self.procs.get(wid)
            if proc is None:
                continue  # a worker already reaped: what it sent last no longer matters
            proc.last_heard = now = time.monotonic()
            if heartbeat:
                self._beat(proc, frame, now)
                continue
            try:
                self._worker_message(wid, decode(frame, MAX_WORKER_FRAME_BYTES), time.monotonic())
            except Exception:
                logger.exception("bad message from worker {}", wid)
        return False

    @staticmethod
    def _beat(proc: WorkerProcess, frame: bytes, now: float) -> None:
        """A heartbeat carries the worker's progress counter (tokens, prompt batches): while it
        moves, a long generation or prompt is not a stall."""
        try:
            progress = decode(frame, MAX_WORKER_FRAME_BYTES).get(PROGRESS)
        except Exception:
            return
        if progress != proc.progress:
            proc.progress = progress
            if proc.progress_at is not None:
                proc.progress_at = now

    def _read_stream(self, proc: WorkerProcess) -> None:
        """Handle what a worker's generation stream holds (all of it: a pipe holds at most its
        buffer, and the worker waits while it is full). Tokens of one request read together
        reach its client as one frame (n > 1): they arrived together, so merging them delays
        nothing and saves a frame per token under load."""
        if proc.stream.fd not in self.streams:
            return  # stopped reading it: ended, or broken
        frames = proc.stream.read()
        if proc.stream.eof or proc.stream.error:
            # An ended pipe reads as ready for ever; its sentinel tells the rest.
            self._stop_reading(proc)
        if frames:
            proc.last_heard = now = time.monotonic()
            if proc.progress_at is not None:
                proc.progress_at = now
            try:
                for frame in frames:
                    try:
                        self._worker_message(proc.wid, decode(frame, MAX_WORKER_FRAME_BYTES), now)
                    except Exception:
                        logger.exception("bad message from worker {}", proc.wid)
            finally:
                self._flush_tokens()
        if proc.stream.error:
            logger.error("worker {} (pid {}) wrote a broken stream ({}); killing it", proc.wid, proc.pid,
                         proc.stream.error)
            proc.signal(signal.SIGKILL)  # its sentinel brings the usual crash handling

    def _stop_reading(self, proc: WorkerProcess) -> None:
        if self.streams.pop(proc.stream.fd, None) is not None:
            self.poller.unregister(proc.stream.fd)

    def _worker_message(self, wid: str, msg: Message, now: float) -> None:
        kind = _KINDS[msg[T]]  # an unknown kind raises KeyError: a bad message, logged
        if kind is W.HELLO:
            self.procs[wid].hello = True
            if msg.get(RSS):
                self.overhead[self.config.models[self.procs[wid].model].backend] = msg[RSS]
            self.scheduler.worker_hello(wid)
        elif kind is W.READY:
            self.procs[wid].load_ms = msg[LOAD_MS]
            self.procs[wid].ready_at = now
            logger.info("worker {} loaded '{}' in {} ms", wid, self.procs[wid].model, msg[LOAD_MS])
            self.metrics.worker_loaded(self.procs[wid].model, msg[LOAD_MS] / 1000)
            self._execute(self.scheduler.worker_ready(wid, now), now)
        elif kind is W.LOAD_FAILED:
            logger.warning("worker {} could not load '{}': {}", wid, self.procs[wid].model, msg[Key.MESSAGE])
            self.scheduler.worker_load_failed(wid, msg[Key.MESSAGE])
        else:
            key = self.by_job.get(msg[RID])
            req = self.requests.get(key) if key is not None else None
            if req is None or req.worker != wid:
                return  # late: the request was answered, or re-run elsewhere after a crash
            if kind is W.TOKEN:
                self._token(key, req, msg, now)
            elif kind is W.END:
                self.procs[wid].progress_at = None
                self._end(key, req, msg, now)
                self._execute(self.scheduler.job_done(wid, now), now)
            elif kind is W.ERROR:
                self.procs[wid].progress_at = None
                self._fail(key, ErrorCode(msg[Key.CODE]), msg[Key.MESSAGE])
                self._execute(self.scheduler.job_done(wid, now), now)

    def _worker_exited(self, proc: WorkerProcess, now: float) -> None:
        self.poller.unregister(proc.sentinel)
        self.sentinels.pop(proc.sentinel, None)
        if proc.stream.partial:
            logger.warning("worker {} died in the middle of a stream frame ({} bytes of it)", proc.wid,
                           proc.stream.partial)
        self._stop_reading(proc)
        detail = proc.reap()
        del self.procs[proc.wid]
        self.frontend.worker_count(len(self.procs))
        asked = proc.term_at is not None or proc.kill_at is not None or proc.exit_sent
        logger.log("INFO" if asked else "WARNING", "worker {} (pid {}, model '{}') {}", proc.wid, proc.pid,
                   proc.model, detail)
        if not asked:
            self.metrics.worker_crashed(proc.model)
        cancelled = [k for k, r in self.requests.items() if r.worker == proc.wid and r.cancelled]
        self._execute(self.scheduler.worker_exited(proc.wid, now, detail), now)
        # A request cancelled (or whose client left) before its worker died is done: it is not
        # worth loading the model again to resume it.
        for key in cancelled:
            if key in self.requests:
                self.end_if_queued(key, self.requests[key])

    def drop_queued(self, key: Key_) -> bool:
        """Drop a request that waits (for its model's file, or in its queue); False if it runs."""
        return self.unhold(key) or self.scheduler.cancel_queued(key)

    def end_if_queued(self, key: Key_, req: ActiveRequest) -> bool:
        """End a request that waits in its queue with `cancelled`; False if it is running."""
        if not self.drop_queued(key):
            return False
        self._flush_tokens(key)
        if not req.client_gone:
            usage = {Key.PROMPT_TOKENS: 0, Key.COMPLETION_TOKENS: req.seq}
            self.send(req.client, m.end(req.request.id, Reason.CANCELLED, usage, self._timings(req, time.monotonic())))
        self._forget(key, Reason.CANCELLED.value)
        return True

    def _to_worker(self, wid: str, kind: W, **keys: Any) -> bool:
        try:
            self.backend.send_multipart([wid.encode(), encode(wmsg(kind, **keys))], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:  # not connected, gone, or not reading: its sentinel tells the rest
            logger.warning("could not send {} to worker {}: {}", kind.value, wid, exc)
            return False

    # ---- actions -------------------------------------------------------------------------------

    def _execute(self, actions: list[Action], now: float) -> None:
        for action in actions:
            if isinstance(action, StartWorker):
                self._start_worker(action, now)
            elif isinstance(action, StopWorker):
                self._stop_worker(action, now)
            elif isinstance(action, Dispatch):
                self._dispatch(action, now)
            elif isinstance(action, FailJob):
                self._fail(action.key, action.code, action.message)
            elif isinstance(action, Notify):
                self._notify(action)
            elif isinstance(action, Answer):
                self.answer_op(action.key)

    def _start_worker(self, action: StartWorker, now: float) -> None:
        model = self.config.models[action.model]
        model = replace(model, n_threads=threads_per_worker(model.n_threads, model.replicas, self.cores))
        try:
            proc = WorkerProcess.start(action.wid, model, self.backend_endpoint, self.log_dir,
                                       self.config.supervisor.worker_liveness, now)
        except Exception as exc:  # any failure to spawn is this worker's failure, not the loop's
            logger.exception("could not start a worker for '{}'", action.model)
            self._execute(self.scheduler.worker_exited(action.wid, now, f"could not start: {exc}"), now)
            return
        self.procs[action.wid] = proc
        self.frontend.worker_count(len(self.procs))
        self.poller.register(proc.sentinel, zmq.POLLIN)
        self.sentinels[proc.sentinel] = proc
        self.poller.register(proc.stream.fd, zmq.POLLIN)
        self.streams[proc.stream.fd] = proc
        self.metrics.worker_started(action.model)
        logger.info("started worker {} (pid {}) for '{}' ({} threads)", action.wid, proc.pid, action.model,
                    model.n_threads)

    def _stop_worker(self, action: StopWorker, now: float) -> None:
        proc = self.procs.get(action.wid)
        if proc is None:
            return
        if action.reason:
            logger.info("stopping worker {} ('{}'): {}", action.wid, proc.model, action.reason)
        if action.evicted:
            self.metrics.evicted(proc.model)
        grace = self.config.supervisor.stop_grace
        if action.force:  # loading: it reads no messages until its model is in memory
            proc.signal(signal.SIGTERM)
            proc.kill_at = now + grace
        else:
            self._to_worker(action.wid, W.EXIT)
            proc.exit_sent = True
            proc.term_at = now + grace

    def _dispatch(self, action: Dispatch, now: float) -> None:
        req = self.requests[action.key]
        req.worker, req.cancel_sent = action.wid, False
        req.dispatched = req.dispatched or now  # queued_ms: the first wait, not a resume's
        if req.waited_for_load:
            req.load_ms = self.procs[action.wid].load_ms
        r = req.request
        # A re-run after its worker died continues from what the client already has.
        body: dict[str, Any] = {**r.sampling, Key.MAX_TOKENS: max(0, req.max_tokens - req.seq)}
        if r.prompt is not None:
            body[Key.PROMPT] = r.prompt
        else:
            body[Key.MESSAGES] = list(r.messages or ())
        keys: dict[str, Any] = {RID: req.job_no, REQUEST: body}
        if req.texts:
            keys[RESUME] = "".join(req.texts)
            logger.info("resuming request {!r} of client {} on worker {} after {} tokens",
                        r.id, req.client.hex(), action.wid, req.seq)
        if not req.running_sent:
            req.running_sent = True
            self.send_info(req, InfoState.RUNNING)
        self.procs[action.wid].progress_at = now
        if not self._to_worker(action.wid, W.GENERATE, **keys):
            # A worker that cannot take its job is broken: kill it, and the job is re-run
            # (resumed) on the replacement.
            self.procs[action.wid].signal(signal.SIGKILL)
            return
        if req.cancelled:  # re-run after a crash, but cancelled (or its client left) meanwhile
            self.cancel_running(req)

    def _notify(self, action: Notify) -> None:
        req = self.requests[action.key]
        if action.loading:
            req.waited_for_load = True
            self.send_info(req, InfoState.LOADING)
        else:
            self.send_info(req, InfoState.QUEUED, position=action.position)

    def send_info(self, req: ActiveRequest, state: InfoState, position: int | None = None) -> None:
        """An `info` for a request, naming this supervisor and the client's connection to it."""
        req.acknowledged = True
        if not req.client_gone:
            self.send(req.client, m.info(req.request.id, state, position, self.session_of(req.client), self.instance,
                                         req.model))

    def session_of(self, client: ClientId) -> str:
        """This client connection to this supervisor: a new one after the client reconnects or
        the supervisor restarts (libzmq gives each new connection a new routing id)."""
        return f"{self.instance}/{client.hex()}"

    def _token(self, key: Key_, req: ActiveRequest, msg: Message, now: float) -> None:
        if req.first_token is None:
            req.first_token = now
        if not req.client_gone:
            req.unsent.append(msg[Key.TEXT])
            req.unsent_n += msg[Key.N]
            self.unflushed.add(key)
        req.seq += msg[Key.N]
        req.texts.append(msg[Key.TEXT])

    def _flush_tokens(self, only: Key_ | None = None) -> None:
        """Send the tokens read but not yet sent (of one request, or of all), one frame each."""
        keys = [only] if only is not None else list(self.unflushed)
        for key in keys:
            self.unflushed.discard(key)
            req = self.requests.get(key)
            if req is None or not req.unsent_n:
                continue
            if not req.client_gone:
                self.send(req.client, m.token(req.request.id, req.seq - req.unsent_n, req.unsent_n,
                                              "".join(req.unsent)))
            req.unsent.clear()
            req.unsent_n = 0

    def _end(self, key: Key_, req: ActiveRequest, msg: Message, now: float) -> None:
        self._flush_tokens(key)  # its last tokens go before its end
        # seq counts every token the client got, from every worker that ran the request.
        usage = {Key.PROMPT_TOKENS: msg[Key.PROMPT_TOKENS], Key.COMPLETION_TOKENS: req.seq}
        if not req.client_gone:
            self.send(req.client, m.end(req.request.id, Reason(msg[Key.REASON]), usage, self._timings(req, now)))
        self._forget(key, msg[Key.REASON])

    @staticmethod
    def _timings(req: ActiveRequest, now: float) -> dict[str, float]:
        def ms(start: float | None, end: float | None) -> float:
            return round((end - start) * 1000, 1) if start is not None and end is not None else 0.0

        return {
            Key.QUEUED_MS: ms(req.accepted, req.dispatched or now),
            Key.LOAD_MS: req.load_ms,
            Key.TTFT_MS: ms(req.accepted, req.first_token),
            Key.TOTAL_MS: ms(req.accepted, now),
        }

    def _fail(self, key: Key_, code: ErrorCode, message: str) -> None:
        req = self.requests.get(key)
        if req is not None:
            self._flush_tokens(key)
            req.acknowledged = True
            if not req.client_gone:
                self.send(req.client, m.error(req.request.id, code, message))
            self._forget(key, code.value)
            return
        op = self.pending_ops.pop(key, None)
        if op is not None:
            self.send(op.client, m.error(key[1], code, message))

    def _forget(self, key: Key_, outcome: str) -> None:
        """The request has had its last reply (or its client is gone): log it, count it, drop it."""
        self.unflushed.discard(key)
        req = self.requests.pop(key)
        outcome = req.outcome or outcome
        self.by_job.pop(req.job_no, None)
        now = time.monotonic()
        t = self._timings(req, now)
        logger.info("request {!r} of client {} on '{}': {}, {} tokens; queued {} ms, load {} ms, ttft {} ms, "
                    "total {} ms", req.request.id, req.client.hex(), req.model, outcome, req.seq,
                    t[Key.QUEUED_MS], t[Key.LOAD_MS], t[Key.TTFT_MS], t[Key.TOTAL_MS])
        ttft = None if req.first_token is None else req.first_token - req.accepted
        stream_s = 0.0 if req.first_token is None else now - req.first_token
        self.metrics.request_ended(req.model, outcome, req.seq, ttft, stream_s)

    def new_job_no(self) -> int:
        self._job_seq += 1
        return self._job_seq
