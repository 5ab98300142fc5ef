"""Which worker runs which request, when workers start and stop: the supervisor's decisions.

Pure: methods take events (and `now`) and return a list of actions for the event loop to carry
out. No sockets, processes or clocks in here, so every decision can be unit-tested.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Union

from stoker.protocol.messages import ErrorCode
from stoker.supervisor.restart_policy import RestartPolicy
from stoker.supervisor.states import (
    JOB_TRANSITIONS,
    WORKER_TRANSITIONS,
    JobState,
    WorkerState,
    check_transition,
)

JobKey = Hashable

# A model whose loaded worker crashed this often within the restart window is no longer kept
# warm: it is started again only when a request needs it.
KEEP_WARM_MAX_CRASHES = 3


@dataclass(frozen=True)
class SchedulerSettings:
    max_queue: int = 256  # per model
    idle_timeout: float = 300.0
    max_retries: int = 2  # a job whose worker dies is run again (resumed) at most this many times


@dataclass
class Job:
    """A generate request as the scheduler sees it."""

    key: JobKey
    model: str
    keep_alive: float | None = None
    state: JobState = JobState.QUEUED
    crashes: int = 0  # workers that died while running it

    def to(self, new: JobState) -> None:
        check_transition(JOB_TRANSITIONS, self.state, new, f"job {self.key!r}")
        self.state = new


@dataclass
class WorkerSlot:
    """A worker process as the scheduler sees it."""

    wid: str
    model: str
    state: WorkerState = WorkerState.STARTING
    job: JobKey | None = None
    idle_since: float | None = None
    idle_deadline: float | None = None
    keep_alive: float | None = None  # from the last request; None = the idle timeout
    served: int = 0
    stop_after_job: bool = False
    load_error: str = ""

    def to(self, new: WorkerState) -> None:
        check_transition(WORKER_TRANSITIONS, self.state, new, f"worker {self.wid}")
        self.state = new


# ---- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartWorker:
    wid: str
    model: str


@dataclass(frozen=True)
class StopWorker:
    wid: str
    force: bool = False  # the worker is busy loading and cannot read an exit message: signal it


@dataclass(frozen=True)
class Dispatch:
    wid: str
    key: JobKey


@dataclass(frozen=True)
class FailJob:
    key: JobKey
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class Notify:
    """Tell a queued job's client where it stands: loading its model, or waiting (position ahead)."""

    key: JobKey
    loading: bool
    position: int = 0


@dataclass(frozen=True)
class Answer:
    """A load or unload request has what it waited for."""

    key: JobKey


Action = Union[StartWorker, StopWorker, Dispatch, FailJob, Notify, Answer]


@dataclass
class _UnloadWait:
    key: JobKey
    wids: set[str] = field(default_factory=set)


class Scheduler:
    """Per-model queues and the workers that serve them."""

    def __init__(self, settings: SchedulerSettings, policy: RestartPolicy | None = None) -> None:
        self.settings = settings
        self.policy = policy or RestartPolicy()
        self.workers: dict[str, WorkerSlot] = {}
        self.jobs: dict[JobKey, Job] = {}
        self.queues: dict[str, deque[JobKey]] = defaultdict(deque)
        self.load_waiters: dict[str, list[JobKey]] = defaultdict(list)
        self.unload_waiters: list[_UnloadWait] = []
        self.restart_due: dict[str, float] = {}
        self.draining = False
        self._next_wid = 0

    # ---- queries -------------------------------------------------------------------------------

    def workers_of(self, model: str, states: Iterable[WorkerState] | None = None) -> list[WorkerSlot]:
        wanted = set(states) if states is not None else set(WorkerState) - {WorkerState.STOPPING}
        return [w for w in self.workers.values() if w.model == model and w.state in wanted]

    def queue_depths(self) -> dict[str, int]:
        return {model: len(q) for model, q in self.queues.items() if q}

    def next_deadline(self) -> float | None:
        times = [w.idle_deadline for w in self.workers.values() if w.idle_deadline is not None]
        times += self.restart_due.values()
        return min(times, default=None)

    # ---- requests ------------------------------------------------------------------------------

    def submit(self, job: Job, now: float) -> list[Action]:
        """A new generate request."""
        if self.policy.tripped(job.model, now):
            return [FailJob(job.key, ErrorCode.LOAD_FAILED, self.policy.tripped_message(job.model, now))]
        queue = self.queues[job.model]
        if len(queue) >= self.settings.max_queue:
            return [FailJob(job.key, ErrorCode.OVERLOADED,
                            f"model '{job.model}' has {len(queue)} requests queued (max_queue); retry later")]
        self.jobs[job.key] = job
        idle = self.workers_of(job.model, [WorkerState.IDLE])
        if idle and not queue:
            return [self._dispatch(idle[0], job)]
        queue.append(job.key)
        actions = self._ensure_worker(job.model, now)
        # Loading: a worker is loading, or one must load once an exiting (or unloading) one is gone.
        loading = any(
            w.model == job.model and (w.state in (WorkerState.STARTING, WorkerState.LOADING, WorkerState.STOPPING)
                                      or w.stop_after_job)
            for w in self.workers.values()
        ) or job.model in self.restart_due
        actions.append(Notify(job.key, loading=loading, position=len(queue) - 1))
        return actions

    def cancel_queued(self, key: JobKey) -> bool:
        """Drop a job that has not been dispatched. False if it is running or unknown."""
        job = self.jobs.get(key)
        if job is None or job.state is not JobState.QUEUED:
            return False
        self.queues[job.model].remove(key)
        del self.jobs[key]
        return True

    def job_done(self, wid: str, now: float) -> list[Action]:
        """The worker finished its job (ended, failed or cancelled) and is free again."""
        slot = self.workers[wid]
        job = self.jobs.pop(slot.job) if slot.job is not None else None
        slot.job = None
        slot.served += 1
        slot.keep_alive = job.keep_alive if job is not None else None
        slot.to(WorkerState.IDLE)
        return self._assign(slot, now)

    def load(self, key: JobKey, model: str, now: float) -> list[Action]:
        """A `load` request: answered once a worker of the model is ready. It also retries a model
        the crash-loop breaker marked failed."""
        self.policy.reset(model)
        self.restart_due.pop(model, None)
        if any(not w.stop_after_job for w in self.workers_of(model, [WorkerState.IDLE, WorkerState.BUSY])):
            return [Answer(key)]
        self.load_waiters[model].append(key)
        return self._ensure_worker(model, now)

    def unload(self, key: JobKey, model: str, now: float) -> list[Action]:
        """An `unload` request: stop the model's workers (busy ones after their job), answer when gone.
        Requests still waiting for the model load it again afterwards."""
        if not self.queues[model] and not self.load_waiters.get(model):
            self.restart_due.pop(model, None)  # a keep-warm restart nobody waits for
        slots = [w for w in self.workers.values() if w.model == model]
        if not slots:
            return [Answer(key)]
        self.unload_waiters.append(_UnloadWait(key, {w.wid for w in slots}))
        actions: list[Action] = []
        for slot in slots:
            if slot.state is WorkerState.BUSY:
                slot.stop_after_job = True
            elif slot.state is not WorkerState.STOPPING:
                actions.append(self._stop(slot))
        return actions

    def drain(self, now: float) -> list[Action]:
        """Shutting down: fail what waits, stop idle and loading workers, let busy ones finish."""
        self.draining = True
        self.restart_due.clear()
        msg = "the supervisor is shutting down; retry once it is running again"
        actions: list[Action] = []
        for model in set(self.queues) | set(self.load_waiters):
            actions += self._fail_waiting(model, ErrorCode.SHUTTING_DOWN, msg)
        for slot in list(self.workers.values()):
            if slot.state is WorkerState.BUSY:
                slot.stop_after_job = True
            elif slot.state is not WorkerState.STOPPING:
                actions.append(self._stop(slot))
        return actions

    # ---- workers -------------------------------------------------------------------------------

    def worker_hello(self, wid: str) -> None:
        slot = self.workers.get(wid)
        if slot is not None and slot.state is WorkerState.STARTING:
            slot.to(WorkerState.LOADING)

    def worker_ready(self, wid: str, now: float) -> list[Action]:
        slot = self.workers[wid]
        if slot.state is WorkerState.STOPPING:
            return []
        if slot.state is WorkerState.STARTING:  # hello and ready can arrive in one poll
            slot.to(WorkerState.LOADING)
        slot.to(WorkerState.IDLE)
        self.policy.record_loaded(slot.model)
        actions: list[Action] = [Answer(k) for k in self.load_waiters.pop(slot.model, [])]
        return actions + self._assign(slot, now)

    def worker_load_failed(self, wid: str, message: str) -> None:
        """The worker reported why its load failed; it exits next, and `worker_exited` decides."""
        slot = self.workers.get(wid)
        if slot is not None:
            slot.load_error = message

    def worker_exited(self, wid: str, now: float, detail: str) -> list[Action]:
        """A worker process is gone. `detail` says how (exit code, last lines of its log)."""
        slot = self.workers.pop(wid)
        actions: list[Action] = []
        model = slot.model
        expected = slot.state is WorkerState.STOPPING
        if slot.state in (WorkerState.STARTING, WorkerState.LOADING):
            self.policy.record_load_failure(model, now, slot.load_error or detail)
            if self.policy.tripped(model, now):
                actions += self._fail_waiting(model, ErrorCode.LOAD_FAILED, self.policy.tripped_message(model, now))
        elif not expected:
            self.policy.record_crash(model, now)
        if slot.job is not None:
            actions += self._orphaned(slot.job, model, detail)
        for wait in list(self.unload_waiters):
            wait.wids.discard(wid)
            if not wait.wids:
                self.unload_waiters.remove(wait)
                actions.append(Answer(wait.key))
        if self.draining:
            return actions
        # Keep a model warm that was warm: replace a crashed worker even with nothing queued,
        # unless it was being unloaded or keeps crashing.
        crashed_warm = (
            not expected
            and slot.state in (WorkerState.IDLE, WorkerState.BUSY)
            and not slot.stop_after_job
            and self.policy.recent_crashes(model, now) < KEEP_WARM_MAX_CRASHES
        )
        if crashed_warm or self.queues[model] or self.load_waiters.get(model):
            actions += self._ensure_worker(model, now)
        return actions

    def tick(self, now: float) -> list[Action]:
        """Timers: idle workers whose time is up stop; due restarts start."""
        actions: list[Action] = []
        for slot in list(self.workers.values()):
            if slot.state is WorkerState.IDLE and slot.idle_deadline is not None and slot.idle_deadline <= now:
                actions.append(self._stop(slot))
        for model, due in list(self.restart_due.items()):
            if due <= now:
                del self.restart_due[model]
                actions += self._ensure_worker(model, now, backed_off=True)
        return actions

    # ---- internals -----------------------------------------------------------------------------

    def _start(self, model: str) -> StartWorker:
        self._next_wid += 1
        wid = f"w{self._next_wid}"
        self.workers[wid] = WorkerSlot(wid=wid, model=model)
        return StartWorker(wid, model)

    def _stop(self, slot: WorkerSlot) -> StopWorker:
        force = slot.state in (WorkerState.STARTING, WorkerState.LOADING)
        slot.to(WorkerState.STOPPING)
        slot.idle_since = slot.idle_deadline = None
        return StopWorker(slot.wid, force=force)

    def _ensure_worker(self, model: str, now: float, backed_off: bool = False) -> list[Action]:
        """Start a worker for the model unless it has one (a stopping one too: its memory is not
        free yet, and its exit calls this again) or a restart is already due. After a recent
        failure the start waits out the policy's backoff first."""
        if self.draining or model in self.restart_due or any(w.model == model for w in self.workers.values()):
            return []
        if self.policy.tripped(model, now):
            return []
        delay = 0.0 if backed_off else self.policy.delay(model, now)
        if delay > 0:
            self.restart_due[model] = now + delay
            return []
        return [self._start(model)]

    def _dispatch(self, slot: WorkerSlot, job: Job) -> Dispatch:
        slot.to(WorkerState.BUSY)
        slot.job = job.key
        slot.idle_since = slot.idle_deadline = None
        job.to(JobState.RUNNING)
        return Dispatch(slot.wid, job.key)

    def _assign(self, slot: WorkerSlot, now: float) -> list[Action]:
        """A worker is idle: give it the next queued job, or start its idle clock."""
        if slot.stop_after_job or self.draining:
            return [self._stop(slot)]
        queue = self.queues[slot.model]
        if queue:
            return [self._dispatch(slot, self.jobs[queue.popleft()])]
        slot.idle_since = now
        keep = slot.keep_alive if slot.keep_alive is not None else self.settings.idle_timeout
        slot.idle_deadline = now + keep
        if keep == 0:
            return [self._stop(slot)]
        return []

    def _orphaned(self, key: JobKey, model: str, detail: str) -> list[Action]:
        """The worker running this job died: run it again from where its stream stands (the event
        loop resumes it), first in line, unless it has used up its retries."""
        job = self.jobs[key]
        job.crashes += 1
        if self.draining:
            del self.jobs[key]
            return [FailJob(key, ErrorCode.SHUTTING_DOWN, "the supervisor shut down before this request finished")]
        if job.crashes > self.settings.max_retries:
            del self.jobs[key]
            return [FailJob(key, ErrorCode.WORKER_CRASHED,
                            f"the worker for model '{model}' died {job.crashes} times while running this request "
                            f"(max_retries = {self.settings.max_retries}); last time: {detail}")]
        job.to(JobState.QUEUED)
        self.queues[model].appendleft(key)
        return []

    def _fail_waiting(self, model: str, code: ErrorCode, message: str) -> list[Action]:
        actions: list[Action] = []
        while self.queues[model]:
            key = self.queues[model].popleft()
            del self.jobs[key]
            actions.append(FailJob(key, code, message))
        actions += [FailJob(k, code, message) for k in self.load_waiters.pop(model, [])]
        return actions
