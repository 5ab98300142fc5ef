"""Memory-aware decisions: placing workers in a budget, evicting idle ones, pins, waiting, replicas."""

from stoker.protocol.messages import ErrorCode
from stoker.supervisor.memory import Budget, Cost
from stoker.supervisor.scheduler import (
    Answer, Dispatch, FailJob, Job, ModelLimits, Notify, Scheduler, SchedulerSettings, StartWorker, StopWorker,
)

GB = 1000


def make(ram=250, vram=None, load_wait=60.0, limits=None, **kw) -> Scheduler:
    s = Scheduler(SchedulerSettings(budget=Budget(ram=ram, vram=vram), load_wait=load_wait, **kw), limits=limits)
    for m in "abc":
        s.costs[m] = Cost(100)
    return s


def starts(actions) -> list[StartWorker]:
    return [a for a in actions if isinstance(a, StartWorker)]


def serve_once(s: Scheduler, model: str, key: str, now: float) -> str:
    """Run one request on the model to completion; returns the worker id."""
    actions = s.submit(Job(key, model), now)
    start = starts(actions)
    if start:
        s.worker_hello(start[0].wid)
        actions = s.worker_ready(start[0].wid, now)
    [d] = [a for a in actions if isinstance(a, Dispatch)]
    s.job_done(d.wid, now + 0.5)
    return d.wid


def test_three_models_in_a_budget_for_two_evict_the_least_recently_used_idle_one():
    s = make()
    wa = serve_once(s, "a", "a1", 1.0)
    wb = serve_once(s, "b", "b1", 2.0)
    assert s.used() == Cost(200)
    actions = s.submit(Job("c1", "c"), 3.0)
    assert actions == [StopWorker(wa), Notify("c1", loading=True, position=0)]
    assert s.used() == Cost(200)  # a's memory counts until it has exited
    [start] = starts(s.worker_exited(wa, 3.2, "exited with code 0"))
    assert start.model == "c" and s.used() == Cost(200)
    s.worker_hello(start.wid)
    assert s.worker_ready(start.wid, 3.5) == [Dispatch(start.wid, "c1")]
    s.job_done(start.wid, 4.0)
    # a again: b is now the least recently used
    assert s.submit(Job("a2", "a"), 5.0)[0] == StopWorker(wb)


def test_a_busy_worker_is_never_evicted_and_the_request_fails_after_load_wait():
    s = make(load_wait=10.0)
    for m, key in (("a", "a1"), ("b", "b1")):
        [start] = starts(s.submit(Job(key, m), 0.0))
        s.worker_hello(start.wid)
        s.worker_ready(start.wid, 0.0)  # dispatches: busy
    actions = s.submit(Job("c1", "c"), 1.0)
    assert not [a for a in actions if isinstance(a, (StopWorker, StartWorker))]
    assert s.memory_wait == {"c": 1.0} and s.next_deadline() == 11.0
    assert s.tick(10.9) == []
    [fail] = s.tick(11.0)
    assert fail.key == "c1" and fail.code is ErrorCode.INSUFFICIENT_MEMORY
    assert "'a' (busy" in fail.message and "'b' (busy" in fail.message and "load_wait" in fail.message
    assert not s.memory_wait and "c1" not in s.jobs


def test_a_waiting_model_starts_when_a_busy_worker_finishes():
    s = make()
    wids = {}
    for m, key in (("a", "a1"), ("b", "b1")):
        [start] = starts(s.submit(Job(key, m), 0.0))
        s.worker_hello(start.wid)
        s.worker_ready(start.wid, 0.0)
        wids[m] = start.wid
    s.submit(Job("c1", "c"), 1.0)
    assert s.job_done(wids["a"], 2.0) == [StopWorker(wids["a"])]
    assert starts(s.worker_exited(wids["a"], 2.1, "exited with code 0"))[0].model == "c"


def test_between_jobs_a_busy_model_yields_to_an_older_waiting_request():
    s = make()
    wids = {}
    for m in "ab":
        [start] = starts(s.submit(Job(f"{m}1", m), 0.0))
        s.worker_hello(start.wid)
        s.worker_ready(start.wid, 0.0)
        wids[m] = start.wid
    s.submit(Job("c1", "c"), 1.0)  # waits for memory from t=1
    s.submit(Job("a2", "a"), 2.0)  # queued behind a1, younger than c1
    assert s.job_done(wids["a"], 3.0) == [StopWorker(wids["a"])]
    assert list(s.queues["a"]) == ["a2"]
    # b's next request is older than anything waiting: b keeps its worker
    s2 = make()
    for m in "ab":
        [start] = starts(s2.submit(Job(f"{m}1", m), 0.0))
        s2.worker_hello(start.wid)
        s2.worker_ready(start.wid, 0.0)
        wids[m] = start.wid
    s2.submit(Job("a2", "a"), 0.5)
    s2.submit(Job("c1", "c"), 1.0)
    assert s2.job_done(wids["a"], 3.0) == [Dispatch(wids["a"], "a2")]


def test_pinned_workers_are_not_evicted_or_unloaded_when_idle():
    s = make(idle_timeout=5.0)
    actions = s.load("pin-a", "a", 0.0, pin=True)
    [start] = starts(actions)
    s.worker_hello(start.wid)
    assert s.worker_ready(start.wid, 0.0) == [Answer("pin-a")]
    assert s.workers[start.wid].idle_deadline is None and s.tick(100.0) == []
    wb = serve_once(s, "b", "b1", 1.0)
    assert s.submit(Job("c1", "c"), 2.0)[0] == StopWorker(wb)  # b goes though a is older
    # unload unpins
    s.unload("u", "a", 3.0)
    assert "a" not in s.pinned


def test_a_model_larger_than_the_whole_budget_fails_at_once():
    s = make()
    s.costs["huge"] = Cost(300)
    [fail] = s.submit(Job("h", "huge"), 0.0)
    assert fail.code is ErrorCode.INSUFFICIENT_MEMORY and "more than the whole budget" in fail.message
    assert "h" not in s.jobs and not s.workers
    [fail] = s.load("l", "huge", 0.0)
    assert isinstance(fail, FailJob) and fail.code is ErrorCode.INSUFFICIENT_MEMORY


def test_vram_is_a_second_budget():
    s = make(ram=10_000, vram=150)
    s.costs["g1"] = Cost(10, 100)
    s.costs["g2"] = Cost(10, 100)
    w1 = serve_once(s, "g1", "x", 0.0)
    assert s.submit(Job("y", "g2"), 1.0)[0] == StopWorker(w1)
    s.costs["g3"] = Cost(10, 200)
    [fail] = s.submit(Job("z", "g3"), 2.0)
    assert "GPU memory" in fail.message


def test_no_budget_means_no_limit():
    s = Scheduler(SchedulerSettings())
    for i in range(20):
        s.costs[f"m{i}"] = Cost(10**12, 10**12)
        assert starts(s.submit(Job(i, f"m{i}"), 0.0))


def test_measured_memory_replaces_the_estimate_and_can_make_room():
    s = make(ram=250)
    s.costs["a"] = Cost(200)  # an overestimate
    [start] = starts(s.submit(Job("a1", "a"), 0.0))
    s.worker_hello(start.wid)
    s.worker_ready(start.wid, 0.0)
    assert not starts(s.submit(Job("b1", "b"), 0.5))  # 200 + 100 > 250: b waits (a is busy)
    [sb] = starts(s.worker_measured(start.wid, Cost(120), 1.0))
    assert sb.model == "b" and s.costs["a"] == Cost(120) and "a" in s.measured_models
    s.worker_measured(start.wid, Cost(90), 2.0)
    assert s.workers[start.wid].charge == Cost(120)  # the peak stays


def test_replicas_start_while_requests_queue_and_memory_is_free():
    s = make(ram=1000, limits={"a": ModelLimits(replicas=3)})
    actions = s.submit(Job("1", "a"), 0.0)
    [first] = starts(actions)
    assert len(starts(s.submit(Job("2", "a"), 0.0))) == 1  # two waiting, one loading
    assert len(starts(s.submit(Job("3", "a"), 0.0))) == 1
    assert starts(s.submit(Job("4", "a"), 0.0)) == []  # replicas = 3
    assert len(s.workers_of("a")) == 3
    # once they are ready and the queue is short, no more start
    for w in list(s.workers.values()):
        s.worker_hello(w.wid)
        assert not starts(s.worker_ready(w.wid, 1.0))


def test_one_loading_worker_covers_one_waiting_request():
    s = make(ram=1000, limits={"a": ModelLimits(replicas=3)})
    [first] = starts(s.submit(Job("1", "a"), 0.0))
    s.worker_hello(first.wid)
    s.worker_ready(first.wid, 0.5)  # busy with 1
    [second] = starts(s.submit(Job("2", "a"), 1.0))  # 1 waiting, none loading
    # 2 waiting, 1 loading: that one covers one of them, so a third replica starts for the other.
    assert len(starts(s.submit(Job("3", "a"), 1.0))) == 1
    assert len(s.workers_of("a")) == 3
    assert starts(s.submit(Job("4", "a"), 1.0)) == []  # replicas = 3: no more


def test_an_extra_replica_never_evicts_and_goes_first():
    s = make(ram=250, limits={"a": ModelLimits(replicas=2)})
    wb = serve_once(s, "b", "b1", 0.0)
    wc = serve_once(s, "c", "c1", 0.5)
    assert s.submit(Job("1", "a"), 1.0)[0] == StopWorker(wb)  # evicts b, the least recently used
    [first] = starts(s.worker_exited(wb, 1.1, "exited"))
    s.worker_hello(first.wid)
    s.worker_ready(first.wid, 1.2)  # busy with job 1
    assert starts(s.submit(Job("2", "a"), 1.3)) == []  # a second one would need c's memory
    s.job_done(first.wid, 2.0)  # takes job 2
    s.job_done(first.wid, 2.5)
    # with room, a second replica starts; idle together, an extra replica is evicted before c
    s2 = make(ram=300, limits={"a": ModelLimits(replicas=2)})
    wc = serve_once(s2, "c", "c1", 0.0)
    [a1] = starts(s2.submit(Job("1", "a"), 1.0))
    [a2] = starts(s2.submit(Job("2", "a"), 1.0))
    for w in (a1, a2):
        s2.worker_hello(w.wid)
        s2.worker_ready(w.wid, 1.5)  # each takes one job
    for w in (a1, a2):
        s2.job_done(w.wid, 2.0)
    assert s2.submit(Job("b1", "b"), 3.0)[0] == StopWorker(a1.wid)  # c is older, but a keeps a2
    assert wc in s2.workers


def test_per_model_idle_timeout_and_keep_alive():
    s = make(idle_timeout=300.0, limits={"a": ModelLimits(idle_timeout=5.0)})
    wa = serve_once(s, "a", "a1", 0.0)
    assert s.workers[wa].idle_deadline == 5.5
    wb = serve_once(s, "b", "b1", 0.0)
    assert s.workers[wb].idle_deadline == 300.5


def test_cancelling_the_last_waiting_request_stops_the_wait():
    s = make()
    for m in "ab":
        [start] = starts(s.submit(Job(f"{m}1", m), 0.0))
        s.worker_hello(start.wid)
        s.worker_ready(start.wid, 0.0)
    s.submit(Job("c1", "c"), 1.0)
    assert "c" in s.memory_wait
    assert s.cancel_queued("c1") and not s.memory_wait


def test_fair_positions_across_clients():
    s = make()
    wa = serve_once(s, "a", "warm", 0.0)
    s.submit(Job("run", "a", client="batch"), 1.0)
    for i in range(5):
        s.submit(Job(f"b{i}", "a", client="batch"), 1.0)
    [note] = s.submit(Job("me", "a", client="cli"), 2.0)
    assert note == Notify("me", loading=False, position=1)
    assert s.job_done(wa, 3.0) == [Dispatch(wa, "b0")]
    assert s.job_done(wa, 4.0) == [Dispatch(wa, "me")]
    [note] = s.submit(Job("vip", "a", client="x", priority=10), 5.0)
    assert note.position == 0


def test_memory_freed_by_an_eviction_goes_to_the_model_that_waited_for_it():
    s = make()
    wa = serve_once(s, "a", "a1", 1.0)
    serve_once(s, "b", "b1", 2.0)
    assert s.submit(Job("c1", "c"), 3.0)[0] == StopWorker(wa)
    s.submit(Job("a2", "a"), 3.1)  # a wants its worker back while it is exiting
    [start] = starts(s.worker_exited(wa, 3.2, "exited with code 0"))
    assert start.model == "c"


def test_a_job_whose_worker_crashed_goes_to_an_idle_replica():
    s = make(ram=1000, limits={"a": ModelLimits(replicas=2)})
    [w1] = starts(s.submit(Job("j1", "a"), 0.0))
    [w2] = starts(s.submit(Job("j2", "a"), 0.0))
    for w in (w1, w2):
        s.worker_hello(w.wid)
        s.worker_ready(w.wid, 0.5)
    s.job_done(w2.wid, 1.0)
    actions = s.worker_exited(w1.wid, 2.0, "killed by SIGKILL")
    assert Dispatch(w2.wid, "j1") in actions


def test_a_model_measured_above_the_budget_still_serves_from_its_loaded_worker():
    s = make(ram=250)
    wa = serve_once(s, "a", "a1", 0.0)
    s.worker_measured(wa, Cost(300), 1.0)  # the estimate was low
    assert s.submit(Job("a2", "a"), 2.0) == [Dispatch(wa, "a2")]
    s.job_done(wa, 3.0)
    assert s.load("L", "a", 4.0) == [Answer("L")]
    s.unload("U", "a", 5.0)
    s.worker_exited(wa, 5.1, "exited")
    [fail] = s.submit(Job("a3", "a"), 6.0)  # now it really cannot load again
    assert fail.code is ErrorCode.INSUFFICIENT_MEMORY


def test_no_extra_replica_takes_memory_another_model_waits_for():
    s = make(ram=300, limits={"a": ModelLimits(replicas=3)})
    [wa] = starts(s.submit(Job("a1", "a"), 0.0))
    s.worker_hello(wa.wid)
    s.worker_ready(wa.wid, 0.0)  # busy
    [wb] = starts(s.submit(Job("b1", "b"), 0.0))
    s.worker_hello(wb.wid)
    s.worker_ready(wb.wid, 0.0)  # busy
    s.costs["c"] = Cost(150)
    s.submit(Job("c1", "c"), 1.0)  # 200 + 150 > 300: waits
    assert "c" in s.memory_wait
    assert starts(s.submit(Job("a2", "a"), 2.0)) == []  # an extra a would fit, but c asked first


def test_workers_measured_above_their_charge_evict_idle_ones_to_get_back_under_the_budget():
    # Two models whose configured memory_bytes claims 100 each, really 200 each, budget 300.
    s = make(ram=300)
    wa = serve_once(s, "a", "a1", 0.0)
    assert s.worker_measured(wa, Cost(200), 0.6) == []  # 200 of 300: fine
    [start] = starts(s.submit(Job("b1", "b"), 1.0))  # b is charged its claim: 200 + 100 fits
    s.worker_hello(start.wid)
    assert s.worker_ready(start.wid, 1.2) == [Dispatch(start.wid, "b1")]
    # b measured at 200: 400 held of 300. The idle a goes at once; b, busy, serves on.
    assert s.worker_measured(start.wid, Cost(200), 1.5) == [StopWorker(wa)]
    assert s.used() == Cost(400)  # until a has exited
    s.worker_exited(wa, 1.7, "exited with code 0")
    assert s.used() == Cost(200)
    # a again: its measured 200 does not fit beside b, so b (idle) is evicted first.
    s.job_done(start.wid, 2.0)
    assert s.submit(Job("a2", "a"), 3.0)[0] == StopWorker(start.wid)


def test_a_busy_worker_over_the_budget_is_evicted_once_idle_if_another_remains():
    s = make(ram=300)
    wa = serve_once(s, "a", "a1", 0.0)
    [da] = [a for a in s.submit(Job("a2", "a"), 0.7) if isinstance(a, Dispatch)]  # a busy again
    [start] = starts(s.submit(Job("b1", "b"), 1.0))
    s.worker_hello(start.wid)
    s.worker_ready(start.wid, 1.2)
    s.worker_measured(wa, Cost(200), 1.4)
    assert s.worker_measured(start.wid, Cost(200), 1.5) == []  # both busy: nothing to evict yet
    assert s.job_done(wa, 2.0) == [StopWorker(wa)]  # a idle: the first to go gets it back under
    assert s.job_done(start.wid, 2.5) == []  # b alone fits
