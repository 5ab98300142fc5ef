"""Workers with several slots (ModelLimits.parallel): dispatch, job_done, crash resume,
cancel and eviction per job. With one slot every other scheduler test is the same as before."""

import pytest

from stoker.supervisor.memory import Budget, Cost
from stoker.supervisor.scheduler import (
    Dispatch, Job, ModelLimits, Notify, Scheduler, SchedulerSettings, StartWorker, StopWorker,
)
from stoker.supervisor.states import WorkerState


def make(parallel=4, ram=None, **limits) -> Scheduler:
    s = Scheduler(SchedulerSettings(max_queue=64, budget=Budget(ram=ram)),
                  limits={"m": ModelLimits(parallel=parallel, **limits), "n": ModelLimits()})
    s.costs["m"] = s.costs["n"] = Cost(100)
    return s


def dispatched(actions) -> list[Dispatch]:
    return [a for a in actions if isinstance(a, Dispatch)]


def loaded(s: Scheduler, model="m", now=0.0, jobs=()) -> tuple[str, list]:
    """Submit jobs (key, client) while a worker loads, then make it ready: its actions."""
    start = None
    for key, client in jobs:
        for a in s.submit(Job(key, model, client=client), now):
            start = a if isinstance(a, StartWorker) else start
    if start is None:
        start = next(a for a in s.load(("op", now), model, now) if isinstance(a, StartWorker))
    s.worker_hello(start.wid)
    return start.wid, s.worker_ready(start.wid, now + 1)


def test_a_worker_fills_its_slots_taking_turns_between_clients():
    s = make()
    jobs = [("a1", "A"), ("a2", "A"), ("a3", "A"), ("a4", "A"), ("b1", "B"), ("b2", "B")]
    wid, actions = loaded(s, jobs=jobs)
    assert [d.key for d in dispatched(actions)] == ["a1", "b1", "a2", "b2"]
    assert all(d.wid == wid for d in dispatched(actions))
    assert s.workers[wid].jobs == {"a1", "b1", "a2", "b2"} and s.workers[wid].state is WorkerState.BUSY
    assert s.queue_depths() == {"m": 2}
    assert [a for a in actions if isinstance(a, StartWorker)] == []  # one replica: it waits for a slot


def test_a_worker_with_a_free_slot_takes_a_new_job_at_once():
    s = make()
    wid, _ = loaded(s)
    assert s.submit(Job("j1", "m"), 2.0) == [Dispatch(wid, "j1")]
    assert s.submit(Job("j2", "m"), 2.0) == [Dispatch(wid, "j2")]  # busy, but with slots free
    assert s.workers[wid].state is WorkerState.BUSY and s.workers[wid].free == 2


def test_job_done_names_the_job_and_frees_its_slot_for_the_next():
    s = make(parallel=2)
    wid, _ = loaded(s, jobs=[("j1", None), ("j2", None), ("j3", None)])
    assert s.workers[wid].jobs == {"j1", "j2"}
    with pytest.raises(ValueError):
        s.job_done(wid, 2.0)  # two jobs: which one?
    with pytest.raises(ValueError):
        s.job_done(wid, 2.0, "j3")  # not on this worker
    assert s.job_done(wid, 2.0, "j2") == [Dispatch(wid, "j3")]
    assert s.workers[wid].jobs == {"j1", "j3"} and s.workers[wid].idle_since is None
    assert s.job_done(wid, 3.0, "j1") == []
    assert s.workers[wid].state is WorkerState.BUSY  # idle means no job at all
    s.job_done(wid, 4.0, "j3")
    assert s.workers[wid].state is WorkerState.IDLE and s.workers[wid].idle_since == 4.0
    assert s.workers[wid].served == 3


def test_a_crash_resumes_all_its_jobs_first_in_line_in_their_order():
    s = make()
    wid, _ = loaded(s, jobs=[("j1", None), ("j2", None), ("j3", None), ("j4", None), ("j5", None)])
    actions = s.worker_exited(wid, 5.0, "killed by SIGKILL")
    [start] = [a for a in actions if isinstance(a, StartWorker)]
    assert list(s.queues["m"]) == ["j1", "j2", "j3", "j4", "j5"]  # the four resumed ahead of j5
    s.worker_hello(start.wid)
    assert [d.key for d in dispatched(s.worker_ready(start.wid, 6.0))] == ["j1", "j2", "j3", "j4"]
    assert all(s.jobs[k].crashes == 1 for k in ("j1", "j2", "j3", "j4"))


def test_jobs_its_worker_was_told_to_stop_end_with_it():
    s = make()
    wid, _ = loaded(s, jobs=[("keep", None), ("cancelled", None)])
    s.worker_exited(wid, 5.0, "crashed", ended={"cancelled"})
    assert list(s.queues["m"]) == ["keep"] and "cancelled" not in s.jobs


def test_cancel_frees_one_slot_and_the_others_go_on():
    s = make(parallel=2)
    wid, _ = loaded(s, jobs=[("j1", None), ("j2", None), ("j3", None)])
    assert s.cancel_queued("j1") is False  # running: its worker ends it
    assert s.cancel_queued("j3") is True  # queued: gone at once
    assert s.job_done(wid, 2.0, "j1") == []  # the cancelled job's end frees its slot
    assert s.workers[wid].jobs == {"j2"} and s.workers[wid].free == 1


def test_a_worker_with_any_job_is_never_evicted():
    s = make(ram=150)
    wid, _ = loaded(s)
    s.submit(Job("j1", "m"), 2.0)
    actions = s.submit(Job("other", "n"), 3.0)
    assert [a for a in actions if isinstance(a, StopWorker)] == []
    assert actions == [Notify("other", loading=True, position=0)] and "n" in s.memory_wait
    actions = s.job_done(wid, 4.0, "j1")  # now idle: it may make room
    assert StopWorker(wid) in actions


def test_stop_after_jobs_waits_for_every_slot():
    s = make()
    wid, _ = loaded(s)
    s.submit(Job("j1", "m"), 1.0)
    s.submit(Job("j2", "m"), 1.0)
    assert s.unload(("u", 1), "m", 1.5) == []
    assert s.job_done(wid, 2.0, "j1") == []
    assert s.job_done(wid, 3.0, "j2") == [StopWorker(wid)]


def test_drain_lets_every_running_job_finish():
    s = make()
    wid, _ = loaded(s, jobs=[("j1", None), ("j2", None)])
    assert s.drain(2.0) == []
    assert s.job_done(wid, 3.0, "j1") == []
    assert s.job_done(wid, 4.0, "j2") == [StopWorker(wid)]


def test_a_loading_worker_counts_as_all_its_slots_before_another_replica_starts():
    s = make(replicas=2)
    starts = [a for i in range(4) for a in s.submit(Job(f"j{i}", "m"), 0.0) if isinstance(a, StartWorker)]
    assert len(starts) == 1  # four queued fit the four slots of the worker that loads
    assert [a for a in s.submit(Job("j4", "m"), 0.0) if isinstance(a, StartWorker)] != []  # a fifth does not


def test_a_job_on_its_last_try_runs_alone_so_a_poison_job_fails_alone():
    """max_retries = 2: after two deaths with all four aboard, each of the four runs alone; the
    one that kills its worker fails, the others finish."""
    s = Scheduler(SchedulerSettings(max_queue=64, max_retries=2), limits={"m": ModelLimits(parallel=4)})
    s.costs["m"] = Cost(100)
    wid, _ = loaded(s, jobs=[(f"j{i}", None) for i in range(4)])
    for death in (1, 2):
        [start] = [a for a in s.worker_exited(wid, 5.0 * death, "killed") if isinstance(a, StartWorker)]
        s.worker_hello(start.wid)
        ready = dispatched(s.worker_ready(start.wid, 5.0 * death + 1))
        wid = start.wid
        if death == 1:
            assert [d.key for d in ready] == ["j0", "j1", "j2", "j3"]  # the first resume: all four together
    assert [d.key for d in ready] == ["j0"] and s.workers[wid].alone and s.workers[wid].free == 0
    assert dispatched(s.submit(Job("new", "m"), 11.0)) == []  # even a new job waits: it queues behind them
    failed = [a for a in s.worker_exited(wid, 12.0, "killed") if not isinstance(a, StartWorker)]
    assert [a.key for a in failed if hasattr(a, "code")] == ["j0"]  # the poison job, alone, fails
    [start] = [w for w in s.workers.values()]
    s.worker_hello(start.wid)
    assert [d.key for d in dispatched(s.worker_ready(start.wid, 13.0))] == ["j1"]  # then each alone
    assert [d.key for d in dispatched(s.job_done(start.wid, 14.0, "j1"))] == ["j2"]
    assert [d.key for d in dispatched(s.job_done(start.wid, 15.0, "j2"))] == ["j3"]
    assert [d.key for d in dispatched(s.job_done(start.wid, 16.0, "j3"))] == ["new"]  # back to sharing
    assert not s.workers[start.wid].alone


def test_a_freed_slot_goes_to_the_waiting_client_that_holds_fewest():
    """A holds all 4 slots and queues 4 more; B queues 1 after them: the first slot to free is B's
    (round-robin alone would give it to A, first in the rotation)."""
    s = make()
    wid, _ = loaded(s)
    for i in range(8):
        s.submit(Job(f"a{i}", "m", client="A"), 2.0 + i / 100)
    s.submit(Job("b0", "m", client="B"), 3.0)
    assert s.workers[wid].jobs == {"a0", "a1", "a2", "a3"}
    assert [d.key for d in dispatched(s.job_done(wid, 4.0, "a0"))] == ["b0"]
    assert [d.key for d in dispatched(s.job_done(wid, 5.0, "a1"))] == ["a4"]


def test_fair_queue_pop_prefers_fewer_running_then_rotation():
    from stoker.supervisor.fair_queue import FairQueue

    q = FairQueue()
    for key, client in [("a1", "A"), ("a2", "A"), ("b1", "B"), ("c1", "C")]:
        q.push(key, client)
    assert q.pop({"A": 3, "B": 1}) == "c1"  # C runs nothing
    assert q.pop({"A": 3, "B": 1}) == "b1"  # fewer than A
    assert q.pop({"A": 3}) == "a1" and q.pop() == "a2"
