"""The supervisor's decisions, event by event, with no processes or sockets."""

import pytest

from stoker.protocol.messages import ErrorCode
from stoker.supervisor.restart_policy import RestartPolicy, RestartSettings
from stoker.supervisor.scheduler import (
    MAX_ATTEMPTS, Answer, Dispatch, FailJob, Job, Notify, Scheduler, SchedulerSettings, StartWorker, StopWorker,
)
from stoker.supervisor.states import InvalidTransition, WorkerState


def make(**kw) -> Scheduler:
    return Scheduler(SchedulerSettings(**{"max_queue": 4, "idle_timeout": 300.0, **kw}))


def ready_worker(s: Scheduler, model: str = "m", now: float = 0.0) -> str:
    """Submit nothing; start a worker by loading, and make it ready."""
    actions = s.load(("c", f"load-{model}-{now}"), model, now)
    start = next(a for a in actions if isinstance(a, StartWorker))
    s.worker_hello(start.wid)
    s.worker_ready(start.wid, now)
    return start.wid


def test_first_request_starts_a_worker_and_waits_for_it():
    s = make()
    actions = s.submit(Job("j1", "m"), 0.0)
    assert isinstance(actions[0], StartWorker) and actions[0].model == "m"
    assert actions[1] == Notify("j1", loading=True, position=0)
    wid = actions[0].wid
    s.worker_hello(wid)
    assert s.workers[wid].state is WorkerState.LOADING
    assert s.worker_ready(wid, 1.0) == [Dispatch(wid, "j1")]
    assert s.workers[wid].state is WorkerState.BUSY


def test_warm_idle_worker_takes_the_request_at_once():
    s = make()
    wid = ready_worker(s)
    assert s.submit(Job("j", "m"), 1.0) == [Dispatch(wid, "j")]


def test_busy_worker_queues_then_serves_in_order():
    s = make()
    wid = ready_worker(s)
    s.submit(Job("a", "m"), 1.0)
    assert s.submit(Job("b", "m"), 1.0) == [Notify("b", loading=False, position=0)]
    assert s.submit(Job("c", "m"), 1.0) == [Notify("c", loading=False, position=1)]
    assert s.queue_depths() == {"m": 2}
    assert s.job_done(wid, 2.0) == [Dispatch(wid, "b")]
    assert s.job_done(wid, 3.0) == [Dispatch(wid, "c")]
    assert s.job_done(wid, 4.0) == []
    assert s.workers[wid].served == 3


def test_full_queue_is_overloaded_and_changes_nothing():
    s = make(max_queue=2)
    ready_worker(s)
    s.submit(Job("run", "m"), 0)
    s.submit(Job("q1", "m"), 0)
    s.submit(Job("q2", "m"), 0)
    [fail] = s.submit(Job("q3", "m"), 0)
    assert isinstance(fail, FailJob) and fail.code is ErrorCode.OVERLOADED and "max_queue" in fail.message
    assert "q3" not in s.jobs and s.queue_depths() == {"m": 2}


def test_models_are_independent():
    s = make()
    a = s.submit(Job("a", "m1"), 0)[0]
    b = s.submit(Job("b", "m2"), 0)[0]
    assert isinstance(a, StartWorker) and isinstance(b, StartWorker) and a.wid != b.wid


def test_idle_worker_unloads_after_idle_timeout():
    s = make(idle_timeout=10.0)
    wid = ready_worker(s, now=0.0)
    assert s.next_deadline() == 10.0
    assert s.tick(9.9) == []
    assert s.tick(10.0) == [StopWorker(wid)]
    assert s.workers[wid].state is WorkerState.STOPPING
    assert s.worker_exited(wid, 10.5, "exited with code 0") == []
    assert wid not in s.workers


def test_keep_alive_overrides_idle_timeout_and_zero_unloads_at_once():
    s = make(idle_timeout=300.0)
    wid = ready_worker(s)
    s.submit(Job("a", "m", keep_alive=5.0), 1.0)
    s.job_done(wid, 2.0)
    assert s.workers[wid].idle_deadline == 7.0
    s.submit(Job("b", "m", keep_alive=0.0), 3.0)
    assert s.job_done(wid, 4.0) == [StopWorker(wid)]


def test_queued_cancel_removes_only_queued_jobs():
    s = make()
    wid = ready_worker(s)
    s.submit(Job("run", "m"), 0)
    s.submit(Job("wait", "m"), 0)
    assert not s.cancel_queued("run")
    assert s.cancel_queued("wait")
    assert not s.cancel_queued("wait")
    assert s.job_done(wid, 1) == []


def test_crash_before_streaming_reruns_the_job_on_a_replacement():
    s = make()
    wid = ready_worker(s)
    s.submit(Job("j", "m"), 0)
    actions = s.worker_exited(wid, 1.0, "killed by SIGKILL")
    # The first failure in the window restarts at once; the job waits at the head of the queue.
    [start] = actions
    assert isinstance(start, StartWorker)
    assert list(s.queues["m"]) == ["j"]
    s.worker_hello(start.wid)
    assert s.worker_ready(start.wid, 2.0) == [Dispatch(start.wid, "j")]


def test_crash_while_streaming_fails_the_job():
    s = make()
    wid = ready_worker(s)
    s.submit(Job("j", "m"), 0)
    s.job_streaming("j")
    actions = s.worker_exited(wid, 1.0, "killed by SIGKILL")
    fail = next(a for a in actions if isinstance(a, FailJob))
    assert fail.code is ErrorCode.WORKER_CRASHED and "SIGKILL" in fail.message
    assert "j" not in s.jobs


def test_a_job_that_keeps_killing_workers_is_not_rerun_forever():
    s = make()
    wid = ready_worker(s)
    s.submit(Job("j", "m"), 0)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        actions = s.worker_exited(wid, float(attempt), "killed by SIGSEGV")
        if attempt == MAX_ATTEMPTS:
            assert any(isinstance(a, FailJob) and a.code is ErrorCode.WORKER_CRASHED for a in actions)
            return
        now = float(attempt)
        while not any(isinstance(a, StartWorker) for a in actions):
            now += 0.5
            actions = s.tick(now)
        wid = next(a for a in actions if isinstance(a, StartWorker)).wid
        s.worker_hello(wid)
        assert s.worker_ready(wid, now) == [Dispatch(wid, "j")]


def test_crashed_idle_worker_is_replaced_to_keep_the_model_warm():
    s = make()
    wid = ready_worker(s)
    [start] = s.worker_exited(wid, 5.0, "killed by SIGKILL")
    assert isinstance(start, StartWorker) and start.model == "m"


def test_restart_backoff_grows_and_then_starts():
    s = make()
    wid = ready_worker(s)
    s.worker_exited(wid, 1.0, "crash")  # first: restart at once
    wid2 = next(iter(s.workers))
    s.worker_hello(wid2)
    s.worker_ready(wid2, 1.1)
    assert s.worker_exited(wid2, 1.2, "crash") == []  # second within the window: back off
    due = s.restart_due["m"]
    assert due == pytest.approx(1.2 + 0.5)
    assert s.tick(due - 0.01) == []
    # Regression: the due restart must start, not be postponed again by the same backoff.
    [start] = s.tick(due)
    assert isinstance(start, StartWorker)


def test_three_load_failures_in_a_minute_fail_queued_requests_with_the_reason():
    s = make()
    actions = s.submit(Job("j", "m"), 0.0)
    wid, now = actions[0].wid, 0.0
    for n in range(3):
        s.worker_hello(wid)
        s.worker_load_failed(wid, "FileNotFoundError: model file /x.gguf does not exist")
        actions = s.worker_exited(wid, now, "exited with code 3")
        if n < 2:
            while not actions:
                now += 0.25
                actions = s.tick(now)
            wid = next(a for a in actions if isinstance(a, StartWorker)).wid
    [fail] = actions
    assert fail.key == "j" and fail.code is ErrorCode.LOAD_FAILED
    assert "3 times" in fail.message and "/x.gguf does not exist" in fail.message
    # While given up, new requests fail at once rather than load again...
    [again] = s.submit(Job("k", "m"), now + 1)
    assert again.code is ErrorCode.LOAD_FAILED
    # ...until the first failure leaves the 60 s window.
    assert isinstance(s.submit(Job("l", "m"), 60.5)[0], StartWorker)


def test_load_failure_message_falls_back_to_exit_detail():
    s = Scheduler(SchedulerSettings(), RestartPolicy(RestartSettings(max_load_failures=1)))
    wid = s.submit(Job("j", "m"), 0)[0].wid
    [fail] = s.worker_exited(wid, 0.1, "killed by SIGSEGV; last log lines: boom")
    assert "SIGSEGV" in fail.message and "boom" in fail.message


def test_successful_load_forgets_earlier_load_failures():
    s = make()
    now = 0.0

    def next_start(actions):
        nonlocal now
        while not any(isinstance(a, StartWorker) for a in actions):
            now += 0.25
            actions = s.tick(now)
        return next(a for a in actions if isinstance(a, StartWorker)).wid

    wid = next_start(s.submit(Job("j", "m"), now))
    for _ in range(2):  # two failed loads...
        wid = next_start(s.worker_exited(wid, now, "crash at load"))
    s.worker_hello(wid)
    assert s.worker_ready(wid, now) == [Dispatch(wid, "j")]  # ...then a good one
    s.job_done(wid, now)
    s.unload("U", "m", now)
    s.worker_exited(wid, now, "exited with code 0")
    wid = next_start(s.submit(Job("k", "m"), now))
    for _ in range(2):  # two more: four in the window, but not three in a row
        actions = s.worker_exited(wid, now, "crash at load")
        assert not any(isinstance(a, FailJob) for a in actions)
        wid = next_start(actions)
    assert not s.policy.gave_up("m", now)


def test_load_op_answers_when_ready_and_at_once_when_warm():
    s = make()
    [start] = s.load("L1", "m", 0)
    s.worker_hello(start.wid)
    assert s.worker_ready(start.wid, 1) == [Answer("L1")]
    assert s.load("L2", "m", 2) == [Answer("L2")]


def test_unload_stops_idle_now_and_busy_after_their_job():
    s = make()
    a = ready_worker(s, "m")
    s.submit(Job("j", "m"), 0)
    assert s.workers[a].state is WorkerState.BUSY
    assert s.unload("U", "m", 1) == []
    assert s.job_done(a, 2) == [StopWorker(a)]
    assert s.worker_exited(a, 3, "exited with code 0") == [Answer("U")]
    assert s.unload("U2", "m", 4) == [Answer("U2")]


def test_stopping_a_loading_worker_is_forced():
    s = make()
    wid = s.submit(Job("j", "m"), 0)[0].wid
    s.cancel_queued("j")
    assert s.unload("U", "m", 1) == [StopWorker(wid, force=True)]


def test_drain_fails_waiting_work_and_lets_running_work_finish():
    s = make()
    wid = ready_worker(s)
    s.submit(Job("run", "m"), 0)
    s.submit(Job("wait", "m"), 0)
    other = s.submit(Job("o", "m2"), 0)[0].wid
    actions = s.drain(1.0)
    assert FailJob("wait", ErrorCode.SHUTTING_DOWN, actions[0].message) in actions
    assert FailJob("o", ErrorCode.SHUTTING_DOWN, actions[0].message) in actions
    assert StopWorker(other, force=True) in actions
    assert s.job_done(wid, 2.0) == [StopWorker(wid)]
    assert s.worker_exited(wid, 3.0, "exited with code 0") == []
    assert s.worker_exited(other, 3.0, "killed by SIGTERM") == []  # no restart while draining


def test_impossible_transitions_raise():
    s = make()
    wid = ready_worker(s)
    with pytest.raises(InvalidTransition):
        s.job_done(wid, 1.0)  # idle -> idle


def test_unload_while_a_restart_is_due_does_not_strand_waiting_work():
    s = make()
    wid = ready_worker(s)
    s.worker_exited(wid, 1.0, "crash")
    wid = next(iter(s.workers))
    s.worker_hello(wid)
    s.worker_ready(wid, 1.1)
    s.worker_exited(wid, 1.2, "crash")  # second crash: a restart is due, not started
    assert "m" in s.restart_due
    s.submit(Job("j", "m"), 1.3)
    s.load("L", "m", 1.3)
    assert s.unload("U", "m", 1.4) == [Answer("U")]  # no worker to stop...
    [start] = s.tick(s.restart_due["m"])  # ...and the waiting work still gets its worker
    s.worker_hello(start.wid)
    assert s.worker_ready(start.wid, 3.0) == [Answer("L"), Dispatch(start.wid, "j")]


def test_drain_fails_a_load_of_a_model_that_never_had_a_request():
    s = make()
    [start] = s.load("L", "heavy", 0.0)
    actions = s.drain(0.5)
    assert FailJob("L", ErrorCode.SHUTTING_DOWN, actions[0].message) in actions
    assert StopWorker(start.wid, force=True) in actions


def test_a_model_that_keeps_crashing_after_loading_is_not_kept_warm_forever():
    s = make()
    now, restarts = 0.0, 0
    wid = ready_worker(s)
    for _ in range(10):
        actions = s.worker_exited(wid, now, "crash")
        while not actions and s.restart_due:
            now = s.restart_due["m"]
            actions = s.tick(now)
        if not actions:
            break
        restarts += 1
        wid = actions[0].wid
        s.worker_hello(wid)
        s.worker_ready(wid, now)
    assert restarts == 2 and s.workers == {} and not s.restart_due
    # A request still gets a worker (with backoff): only keeping it warm stopped.
    s.submit(Job("j", "m"), now)
    assert any(isinstance(a, StartWorker) for a in s.tick(s.restart_due["m"]))


def test_a_new_request_waits_for_a_stopping_worker_to_exit_instead_of_loading_a_second_copy():
    s = make(idle_timeout=1.0)
    wid = ready_worker(s)
    assert s.tick(1.0) == [StopWorker(wid)]
    assert s.submit(Job("j", "m"), 1.1) == [Notify("j", loading=True, position=0)]
    [start] = s.worker_exited(wid, 1.5, "exited with code 0")
    assert isinstance(start, StartWorker) and len(s.workers) == 1


def test_load_after_unload_of_a_busy_worker_waits_for_a_fresh_worker():
    s = make()
    wid = ready_worker(s)
    s.submit(Job("j", "m"), 0)
    s.unload("U", "m", 1)
    assert s.load("L", "m", 2) == []  # the busy worker is on its way out
    assert s.job_done(wid, 3) == [StopWorker(wid)]
    actions = s.worker_exited(wid, 4, "exited with code 0")
    assert actions[0] == Answer("U") and isinstance(actions[1], StartWorker)


def test_an_unloading_worker_that_crashes_is_not_restarted():
    s = make()
    wid = ready_worker(s)
    s.submit(Job("j", "m"), 0)
    s.job_streaming("j")  # so it fails rather than waiting for a new worker
    s.unload("U", "m", 1)
    actions = s.worker_exited(wid, 2, "killed by SIGKILL")
    assert Answer("U") in actions and not any(isinstance(a, StartWorker) for a in actions)
