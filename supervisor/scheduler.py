"""Which worker runs which request, when workers start and stop: the supervisor's decisions.

Pure: methods take events (and `now`) and return a list of actions for the event loop to carry
out. No sockets, processes or clocks in here, so every decision can be unit-tested.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Hashable, Iterable, Mapping, Union

from stoker.protocol.messages import ErrorCode
from stoker.supervisor.fair_queue import FairQueue
from stoker.supervisor.memory import Budget, Cost
from stoker.supervisor.restart_policy import RestartPolicy
from stoker.supervisor.sizes import format_size
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
    budget: Budget = Budget()  # what all workers may hold together
    load_wait: float = 60.0  # how long work waits for memory before insufficient_memory


@dataclass(frozen=True)
class ModelLimits:
    replicas: int = 1  # workers it may get while its requests queue
    idle_timeout: float | None = None  # None: the supervisor's
    parallel: int = 1  # requests one worker of it runs at once (its slots)


@dataclass
class Job:
    """A generate request as the scheduler sees it."""

    key: JobKey
    model: str
    keep_alive: float | None = None
    client: Hashable = None  # whose it is, for fair turns (None: the job is its own client)
    priority: int = 0  # higher first
    since: float = 0.0  # when it was submitted
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
    capacity: int = 1  # slots: jobs it runs at once
    jobs: set[JobKey] = field(default_factory=set)  # the jobs it runs; idle means none
    idle_since: float | None = None
    idle_deadline: float | None = None
    keep_alive: float | None = None  # from the last request; None = the idle timeout
    # A `load`'s keep_alive that came after the jobs it runs now were dispatched: it outlives
    # them, until a later request is dispatched here.
    load_keep_alive: float | None = None
    served: int = 0
    stop_after_job: bool = False
    load_error: str = ""
    charge: Cost = Cost()  # memory counted against the budget: the estimate, then measured
    measured: bool = False
    # It runs a job on its last try (see Scheduler._last_try), alone: with several jobs on a
    # worker, which one killed it is unknown, and a job that kills every worker must not take
    # the ones that shared its worker down with it.
    alone: bool = False

    def to(self, new: WorkerState) -> None:
        check_transition(WORKER_TRANSITIONS, self.state, new, f"worker {self.wid}")
        self.state = new

    @property
    def free(self) -> int:
        """Slots it has free: jobs it would take now (none unless loaded and staying)."""
        if self.state not in (WorkerState.IDLE, WorkerState.BUSY) or self.stop_after_job or self.alone:
            return 0
        return max(0, self.capacity - len(self.jobs))


# ---- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartWorker:
    wid: str
    model: str


@dataclass(frozen=True)
class StopWorker:
    wid: str
    force: bool = False  # the worker is busy loading and cannot read an exit message: signal it
    reason: str = field(default="", compare=False)  # for the log, when it is not the obvious one
    evicted: bool = field(default=False, compare=False)  # stopped to make room for another model


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
    """Per-model fair queues, the workers that serve them, and the memory they hold."""

    def __init__(self, settings: SchedulerSettings, policy: RestartPolicy | None = None,
                 limits: Mapping[str, ModelLimits] | None = None) -> None:
        self.settings = settings
        self.policy = policy or RestartPolicy()
        self.limits = dict(limits or {})
        self.workers: dict[str, WorkerSlot] = {}
        self.jobs: dict[JobKey, Job] = {}
        self.queues: dict[str, FairQueue] = defaultdict(FairQueue)
        self.load_waiters: dict[str, list[JobKey]] = defaultdict(list)
        self.load_keep_alive: dict[str, float] = {}  # a load's keep_alive, for the worker it waits for
        self.load_since: dict[JobKey, float] = {}
        self.unload_waiters: list[_UnloadWait] = []
        self.restart_due: dict[str, float] = {}
        self.costs: dict[str, Cost] = {}  # per model: the estimate until a worker of it is measured
        self.measured_models: set[str] = set()
        self.pinned: set[str] = set()
        # Models that need a worker and wait for memory, first asker first -> since when.
        self.memory_wait: dict[str, float] = {}
        self.draining = False
        self._next_wid = 0

    # ---- queries -------------------------------------------------------------------------------

    def workers_of(self, model: str, states: Iterable[WorkerState] | None = None) -> list[WorkerSlot]:
        wanted = set(states) if states is not None else set(WorkerState) - {WorkerState.STOPPING}
        return [w for w in self.workers.values() if w.model == model and w.state in wanted]

    def queue_depths(self) -> dict[str, int]:
        return {model: len(q) for model, q in self.queues.items() if q}

    def used(self) -> Cost:
        """Memory held by every worker, stopping ones included (it is free once they exit)."""
        total = Cost()
        for w in self.workers.values():
            total += w.charge
        return total

    def cost_of(self, model: str) -> Cost:
        return self.costs.get(model, Cost())

    def set_budget(self, budget: Budget) -> None:
        """What all workers may hold together (known once the supervisor has measured the machine)."""
        self.settings = replace(self.settings, budget=budget)

    def set_cost(self, model: str, cost: Cost) -> None:
        """The model's estimated cost, until a worker of it is measured (then that stands)."""
        if model not in self.measured_models:
            self.costs[model] = cost

    def next_deadline(self) -> float | None:
        times = [w.idle_deadline for w in self.workers.values() if w.idle_deadline is not None]
        times += self.restart_due.values()
        times += [t + self.settings.load_wait for t in self._memory_waits()]
        return min(times, default=None)

    # ---- requests ------------------------------------------------------------------------------

    def submit(self, job: Job, now: float) -> list[Action]:
        """A new generate request."""
        # The breaker and the budget decide whether a worker can be loaded; a loaded one serves.
        if not self._serving(job.model):
            if self.policy.tripped(job.model, now):
                return [FailJob(job.key, ErrorCode.LOAD_FAILED, self.policy.tripped_message(job.model, now))]
            too_big = self._too_big(job.model)
            if too_big:
                return [FailJob(job.key, ErrorCode.INSUFFICIENT_MEMORY, too_big)]
        queue = self.queues[job.model]
        client = job.key if job.client is None else job.client
        mine = queue.count(client)
        # Past max_queue only clients that already wait are refused: one batch that fills the
        # queue must not lock out an interactive client with nothing queued (up to a hard 2x).
        if (len(queue) >= self.settings.max_queue and mine) or len(queue) >= 2 * self.settings.max_queue:
            return [FailJob(job.key, ErrorCode.OVERLOADED,
                            f"model '{job.model}' has {len(queue)} requests queued, {mine} of them yours "
                            f"(max_queue {self.settings.max_queue}); retry later")]
        job.since = now
        self.jobs[job.key] = job
        free = self._free_of(job.model)
        if free and not queue:
            # The least loaded; among idle ones the most recently used: the others stay idle
            # longer and are unloaded first.
            return [self._dispatch(min(free, key=lambda w: (len(w.jobs), -(w.idle_since or 0.0))), job)]
        queue.push(job.key, client, job.priority)
        actions = self._ensure_worker(job.model, now)
        # Loading: a worker is loading, or one must load once an exiting (or unloading) one is gone,
        # or memory frees.
        loading = any(
            w.model == job.model and (w.state in (WorkerState.STARTING, WorkerState.LOADING, WorkerState.STOPPING)
                                      or w.stop_after_job)
            for w in self.workers.values()
        ) or job.model in self.restart_due or job.model in self.memory_wait
        actions.append(Notify(job.key, loading=loading, position=queue.position(job.key)))
        return actions

    def cancel_queued(self, key: JobKey) -> bool:
        """Drop a job that has not been dispatched. False if it is running or unknown."""
        job = self.jobs.get(key)
        if job is None or job.state is not JobState.QUEUED:
            return False
        self.queues[job.model].remove(key)
        del self.jobs[key]
        self._drop_memory_wait_if_unwanted(job.model)
        return True

    def job_done(self, wid: str, now: float, key: JobKey | None = None) -> list[Action]:
        """The worker finished a job (ended, failed or cancelled): its slot is free again, and
        the worker idle once it runs none. `key` names the job; it may be left out when the
        worker runs one."""
        actions = self._job_done(wid, now, key)
        if self.workers[wid].state is WorkerState.IDLE:
            actions += self._within_budget()  # it may be the one that must go
        return actions

    def _job_done(self, wid: str, now: float, key: JobKey | None) -> list[Action]:
        slot = self.workers[wid]
        if key is None:
            if len(slot.jobs) > 1:
                raise ValueError(f"worker {wid} runs {len(slot.jobs)} jobs: job_done must name one")
            key = next(iter(slot.jobs), None)
        if key is not None and key not in slot.jobs:
            raise ValueError(f"worker {wid} does not run job {key!r}")
        slot.jobs.discard(key)
        slot.alone = slot.alone and bool(slot.jobs)
        job = self.jobs.pop(key) if key is not None else None
        slot.served += 1
        if slot.load_keep_alive is not None:  # a load came after this job began: it decides
            slot.keep_alive = slot.load_keep_alive
        else:
            slot.keep_alive = job.keep_alive if job is not None else None
        if slot.jobs:
            return self._assign(slot, now)  # a slot is free: the next queued job takes it
        slot.to(WorkerState.IDLE)
        if slot.stop_after_job or self.draining or not self.memory_wait:
            return self._assign(slot, now)
        queue = self.queues[slot.model]
        if not queue:
            return self._assign(slot, now) + self._place_waiting(now)
        # Another model waits for memory. Between two jobs this worker is idle, so it may make
        # room, unless its own next request has waited longer: busy models must not starve idle ones.
        slot.idle_since = now
        oldest_here = min(self.jobs[k].since for k in queue)
        if min(self._memory_waits(), default=now) < oldest_here:
            actions = self._place_waiting(now)
            if slot.state is WorkerState.STOPPING:
                return actions
            return actions + self._assign(slot, now)
        return self._assign(slot, now)

    def load(self, key: JobKey, model: str, now: float, pin: bool = False,
             keep_alive: float | None = None) -> list[Action]:
        """A `load` request: answered once a worker of the model is ready. It also retries a model
        the crash-loop breaker marked failed. Pinned models are never evicted or unloaded for idleness.
        A keep_alive counts as a request's: the model's workers then idle that long (from now, or
        from when the loading one is ready, or when a busy one's jobs end), until a request
        dispatched after it replaces it."""
        too_big = "" if self._serving(model) else self._too_big(model)
        if too_big:
            return [FailJob(key, ErrorCode.INSUFFICIENT_MEMORY, too_big)]
        self.policy.reset(model)
        self.restart_due.pop(model, None)
        if pin:
            self.pinned.add(model)
            for w in self.workers_of(model):
                w.idle_deadline = None
        if keep_alive is not None:
            for w in self.workers_of(model):
                w.keep_alive = w.load_keep_alive = keep_alive
                if w.state is WorkerState.IDLE and not w.jobs and w.idle_deadline is not None:
                    w.idle_deadline = now + keep_alive
        if any(not w.stop_after_job for w in self.workers_of(model, [WorkerState.IDLE, WorkerState.BUSY])):
            return [Answer(key)]
        self.load_waiters[model].append(key)
        if keep_alive is not None:
            self.load_keep_alive[model] = keep_alive
        self.load_since[key] = now
        return self._ensure_worker(model, now)

    def unload(self, key: JobKey, model: str, now: float) -> list[Action]:
        """An `unload` request: stop the model's workers (busy ones after their job), answer when gone.
        It unpins the model. Requests still waiting for the model load it again afterwards."""
        self.pinned.discard(model)
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
        if slot.model in self.load_keep_alive:
            slot.keep_alive = slot.load_keep_alive = self.load_keep_alive.pop(slot.model)
        for k in actions:
            self.load_since.pop(k.key, None)
        actions += self._assign(slot, now)
        return actions + self._ensure_worker(slot.model, now)  # more replicas if work still queues

    def worker_measured(self, wid: str, cost: Cost, now: float) -> list[Action]:
        """What a loaded worker really holds: it replaces the estimate, for this worker and for
        the model's next ones. The peak counts: memory a worker touched once it may touch again."""
        slot = self.workers.get(wid)
        if slot is None or slot.state not in (WorkerState.IDLE, WorkerState.BUSY):
            return []  # while loading its memory is still growing: the estimate stands
        if slot.measured:
            cost = Cost(max(cost.ram, slot.charge.ram), max(cost.vram, slot.charge.vram))
        shrank = not (slot.charge - cost).within(Cost())
        slot.charge, slot.measured = cost, True
        if slot.model in self.measured_models:  # the largest of its workers
            known = self.costs[slot.model]
            cost = Cost(max(cost.ram, known.ram), max(cost.vram, known.vram))
        self.costs[slot.model] = cost
        self.measured_models.add(slot.model)
        actions = self._within_budget()
        if shrank and self.memory_wait:
            actions += self._place_waiting(now)
        return actions

    def worker_load_failed(self, wid: str, message: str) -> None:
        """The worker reported why its load failed; it exits next, and `worker_exited` decides."""
        slot = self.workers.get(wid)
        if slot is not None:
            slot.load_error = message

    def worker_exited(self, wid: str, now: float, detail: str, ended: Iterable[JobKey] = ()) -> list[Action]:
        """A worker process is gone. `detail` says how (exit code, last lines of its log). Its
        jobs run again (resumed), first in line, except those in `ended` (it was told to stop
        them: they end with it)."""
        ended = set(ended)
        slot = self.workers.pop(wid)
        actions: list[Action] = []
        model = slot.model
        expected = slot.state is WorkerState.STOPPING
        if slot.state in (WorkerState.STARTING, WorkerState.LOADING):
            self.policy.record_load_failure(model, now, slot.load_error or detail)
        elif not expected:
            self.policy.record_crash(model, now)
        # Each goes to the front of the queue: the newest first, so that the oldest ends up first
        # (self.jobs holds them in the order they came).
        order = {k: i for i, k in enumerate(self.jobs)}
        for key in sorted(slot.jobs - ended, key=order.__getitem__, reverse=True):
            actions += self._orphaned(key, model, detail)
        for key in slot.jobs & ended:  # stopped on purpose (cancelled): they end with their worker
            del self.jobs[key]
        if slot.jobs - ended:
            actions += self._feed_idle(model, now)
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
        # Its memory is free: first for the models that have waited for memory, then for its own.
        actions += self._place_waiting(now)
        actions += self._ensure_worker(model, now, keep_warm=crashed_warm)
        if self.policy.tripped(model, now) and not any(w.model == model for w in self.workers.values()):
            # No worker is left and none may start: what waits would wait for nothing. (While a
            # worker of the model remains, it serves the queue or its exit brings us back here.)
            actions += self._fail_waiting(model, ErrorCode.LOAD_FAILED, self.policy.tripped_message(model, now))
        return actions

    def tick(self, now: float) -> list[Action]:
        """Timers: idle workers whose time is up stop; due restarts start; work that waited
        load_wait for memory fails."""
        actions: list[Action] = []
        for slot in list(self.workers.values()):
            if slot.state is WorkerState.IDLE and slot.idle_deadline is not None and slot.idle_deadline <= now:
                actions.append(self._stop(slot))
        for model, due in list(self.restart_due.items()):
            if due <= now:
                del self.restart_due[model]
                actions += self._ensure_worker(model, now, backed_off=True)
        for model, since in list(self.memory_wait.items()):
            expired = [k for k in self._waiting_keys(model) if self._waited_since(k, since) + self.settings.load_wait <= now]
            if expired:
                message = self._insufficient_message(model)
                for key in expired:
                    actions.append(self._fail_key(model, key, message))
                self._drop_memory_wait_if_unwanted(model)
        return actions

    # ---- internals -----------------------------------------------------------------------------

    def _serving(self, model: str) -> bool:
        """A worker of the model is loaded and will take requests."""
        return any(not w.stop_after_job for w in self.workers_of(model, [WorkerState.IDLE, WorkerState.BUSY]))

    def _feed_idle(self, model: str, now: float) -> list[Action]:
        """Give queued jobs to the model's workers with free slots (jobs put back after a
        crash, with another replica loaded)."""
        actions: list[Action] = []
        for slot in self._free_of(model):
            if not self.queues[model]:
                break
            actions += self._assign(slot, now)
        return actions

    def _free_of(self, model: str) -> list[WorkerSlot]:
        """The model's loaded workers that would take a job now."""
        return [w for w in self.workers_of(model, [WorkerState.IDLE, WorkerState.BUSY]) if w.free]

    def _start(self, model: str) -> StartWorker:
        self._next_wid += 1
        wid = f"w{self._next_wid}"
        parallel = self.limits.get(model, ModelLimits()).parallel
        self.workers[wid] = WorkerSlot(wid=wid, model=model, capacity=parallel, charge=self.cost_of(model))
        return StartWorker(wid, model)

    def _stop(self, slot: WorkerSlot, reason: str = "", evicted: bool = False) -> StopWorker:
        force = slot.state in (WorkerState.STARTING, WorkerState.LOADING)
        slot.to(WorkerState.STOPPING)
        slot.idle_since = slot.idle_deadline = None
        return StopWorker(slot.wid, force=force, reason=reason, evicted=evicted)

    def _wanted(self, model: str) -> bool:
        return bool(self.queues[model]) or bool(self.load_waiters.get(model))

    def _ensure_worker(self, model: str, now: float, backed_off: bool = False, keep_warm: bool = False) -> list[Action]:
        """Start a worker for the model if its work needs one: the first when it has none (after
        a stopping one has exited: its memory is not free yet), more up to `replicas` while
        requests queue and memory is free. After a recent failure the start waits out the
        policy's backoff first."""
        if self.draining or model in self.restart_due or self.policy.tripped(model, now):
            return []
        live = [w for w in self.workers_of(model) if not w.stop_after_job]
        if live:
            # Slots on their way: a loading worker will take `parallel` of the queued requests.
            coming = sum(w.capacity for w in live if w.state in (WorkerState.STARTING, WorkerState.LOADING))
            replicas = self.limits.get(model, ModelLimits()).replicas
            extra_needed = len(self.queues[model]) > coming and not self._free_of(model)
            # An extra replica only takes memory that is free and that no other model waits for:
            # it never evicts or waits.
            if (len(live) < replicas and extra_needed and not self.memory_wait
                    and self.settings.budget.fits(self.used() + self.cost_of(model))):
                return [self._start(model)]
            return []
        if not (self._wanted(model) or keep_warm) or any(w.model == model for w in self.workers.values()):
            return []
        delay = 0.0 if backed_off else self.policy.delay(model, now)
        if delay > 0:
            self.restart_due[model] = now + delay
            return []
        return self._place(model, now, evict=not keep_warm or self._wanted(model))

    def _place(self, model: str, now: float, evict: bool = True) -> list[Action]:
        """Start the model's first worker if it fits; else stop least-recently-used idle workers
        until it will, and wait for them to exit; else wait for memory (up to load_wait)."""
        cost, budget = self.cost_of(model), self.settings.budget
        used = self.used()
        if budget.fits(used + cost):
            self.memory_wait.pop(model, None)
            return [self._start(model)]
        if not evict:
            return []
        self.memory_wait.setdefault(model, now)
        stopping = Cost()
        for w in self.workers.values():
            if w.state is WorkerState.STOPPING:
                stopping += w.charge
        need = budget.over(used - stopping + cost)  # what must go beyond what is already going
        freed, chosen = Cost(), []
        for slot in self._eviction_order():
            if need.within(freed):
                break
            chosen.append(slot)
            freed += slot.charge
        if not need.within(freed):
            return []  # even every idle worker is not enough: wait for busy ones to finish
        why = f"least recently used idle worker; evicted to make room for '{model}'"
        return [self._stop(slot, why, evicted=True) for slot in chosen]

    def _within_budget(self) -> list[Action]:
        """Workers measured holding more than they were charged (a model whose memory_bytes
        understates it) can put the total over the budget: the difference counts at once. Idle
        workers are stopped, in eviction order, until what stays fits; busy and pinned ones are
        not, and new loads wait meanwhile (the budget looks full). A worker that alone holds more
        than the whole budget is not stopped for it: that frees memory for nobody (and its model
        cannot load again once it has exited: insufficient_memory)."""
        budget = self.settings.budget
        staying = [w for w in self.workers.values() if w.state is not WorkerState.STOPPING]
        excess = budget.over(sum((w.charge for w in staying), Cost()))
        actions: list[Action] = []
        for slot in self._eviction_order():
            if excess.within(Cost()) or len(staying) - len(actions) <= 1:
                break
            actions.append(self._stop(slot, "workers hold more memory than their models were charged, over the "
                                            "budget", evicted=True))
            excess = Cost(max(0, excess.ram - slot.charge.ram), max(0, excess.vram - slot.charge.vram))
        return actions

    def _eviction_order(self) -> list[WorkerSlot]:
        """Idle, unpinned workers, the first to go first: extra replicas (their model keeps
        another worker), then the least recently used."""
        live: dict[str, int] = defaultdict(int)
        for w in self.workers.values():
            if w.state is not WorkerState.STOPPING:
                live[w.model] += 1
        idle = [w for w in self.workers.values()
                if w.state is WorkerState.IDLE and not w.stop_after_job and w.model not in self.pinned]
        return sorted(idle, key=lambda w: (live[w.model] <= 1, w.idle_since or 0.0))

    def _place_waiting(self, now: float) -> list[Action]:
        """Memory may have freed: try the models waiting for it, first asker first."""
        actions: list[Action] = []
        for model in list(self.memory_wait):
            if not self._drop_memory_wait_if_unwanted(model) and not self.workers_of(model):
                actions += self._ensure_worker(model, now)
        return actions

    def _drop_memory_wait_if_unwanted(self, model: str) -> bool:
        """Stop waiting for memory for a model nobody waits for any more; True if dropped."""
        if model in self.memory_wait and not self._wanted(model):
            del self.memory_wait[model]
            return True
        return False

    def _memory_waits(self) -> list[float]:
        """When each piece of work waiting for memory started waiting."""
        return [self._waited_since(k, since) for model, since in self.memory_wait.items()
                for k in self._waiting_keys(model)]

    def _waiting_keys(self, model: str) -> list[JobKey]:
        return list(self.queues[model]) + list(self.load_waiters.get(model, []))

    def _waited_since(self, key: JobKey, wait_started: float) -> float:
        job = self.jobs.get(key)
        asked = job.since if job is not None else self.load_since.get(key, wait_started)
        return max(asked, wait_started)

    def _too_big(self, model: str) -> str:
        """Why the model can never load here ("" if it can): it needs more than the whole budget."""
        budget, cost = self.settings.budget, self.cost_of(model)
        if budget.fits(cost):
            return ""
        limit = Cost(budget.ram or 0, budget.vram or 0)
        return (f"model '{model}' needs {budget.describe(cost)}, more than the whole budget "
                f"({budget.describe(limit)}); raise ram_budget/vram_budget or use a smaller model or n_ctx")

    def _insufficient_message(self, model: str) -> str:
        budget, cost = self.settings.budget, self.cost_of(model)
        holders = []
        for w in sorted(self.workers.values(), key=lambda w: -w.charge.ram):
            why = "pinned" if w.model in self.pinned and w.state is WorkerState.IDLE else w.state.value
            holders.append(f"'{w.model}' ({why}, {format_size(w.charge.ram)})")
        free = Cost((budget.ram or 0) - self.used().ram, (budget.vram or 0) - self.used().vram)
        return (f"model '{model}' needs {budget.describe(cost)} but only {budget.describe(free)} of the budget "
                f"was free for {self.settings.load_wait:g} s (load_wait); in the way: "
                f"{', '.join(holders) or 'nothing'}; retry later, or unload or unpin a model")

    def _running_by_client(self, model: str) -> Counter:
        """Requests each client has running on the model's workers (at most its slots in all)."""
        counts: Counter = Counter()
        for w in self.workers.values():
            if w.model == model:
                for key in w.jobs:
                    job = self.jobs.get(key)
                    if job is not None:
                        counts[job.key if job.client is None else job.client] += 1
        return counts

    def _dispatch(self, slot: WorkerSlot, job: Job) -> Dispatch:
        if slot.state is WorkerState.IDLE:
            slot.to(WorkerState.BUSY)
        slot.jobs.add(job.key)
        slot.load_keep_alive = None  # a request after the load: its keep_alive decides
        slot.idle_since = slot.idle_deadline = None
        job.to(JobState.RUNNING)
        return Dispatch(slot.wid, job.key)

    def _assign(self, slot: WorkerSlot, now: float) -> list[Action]:
        """A worker has free slots: give them the next queued jobs; if it runs none, start its
        idle clock (or stop it, when it was to stop after its jobs)."""
        if slot.stop_after_job or self.draining:
            return [] if slot.jobs else [self._stop(slot)]
        queue = self.queues[slot.model]
        actions: list[Action] = []
        while queue and slot.free:
            head = queue.first_urgent()
            alone = head is not None and slot.capacity > 1 and self._last_try(self.jobs[head])
            if alone and slot.jobs:
                break  # it runs alone: it waits for this worker to empty, and so do those behind it
            actions.append(self._dispatch(slot, self.jobs[queue.pop(self._running_by_client(slot.model))]))
            if alone:
                slot.alone = True
                break
        if slot.jobs:
            return actions
        slot.idle_since = now
        if slot.model in self.pinned:
            return []
        keep = slot.keep_alive
        if keep is None:
            keep = self.limits.get(slot.model, ModelLimits()).idle_timeout
        if keep is None:
            keep = self.settings.idle_timeout
        slot.idle_deadline = now + keep
        if keep == 0:
            return [self._stop(slot)]
        return []

    def _last_try(self, job: Job) -> bool:
        """Its worker died while running it and one more death fails it: it runs alone, so that
        it fails for what it does, not for what shared its worker."""
        return job.crashes > 0 and job.crashes >= self.settings.max_retries

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
        self.queues[model].push_front(key)
        return []

    def _fail_key(self, model: str, key: JobKey, message: str) -> FailJob:
        if key in self.jobs:
            self.queues[model].remove(key)
            del self.jobs[key]
        else:
            self.load_waiters[model].remove(key)
            self.load_since.pop(key, None)
            if not self.load_waiters[model]:
                self.load_keep_alive.pop(model, None)  # for a worker that no load waits for now
        return FailJob(key, ErrorCode.INSUFFICIENT_MEMORY, message)

    def _fail_waiting(self, model: str, code: ErrorCode, message: str) -> list[Action]:
        actions: list[Action] = []
        queue = self.queues[model]
        while queue:
            key = queue.pop()
            del self.jobs[key]
            actions.append(FailJob(key, code, message))
        for key in self.load_waiters.pop(model, []):
            self.load_since.pop(key, None)
            actions.append(FailJob(key, code, message))
        self.load_keep_alive.pop(model, None)
        self.memory_wait.pop(model, None)
        return actions
