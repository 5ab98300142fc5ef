"""The supervisor's decisions, event by event, with no processes or sockets."""

import pytest

from stoker.protocol.messages import ErrorCode
from stoker.supervisor.restart_policy import RestartPolicy, RestartSettings
from stoker.supervisor.scheduler import (
    Answer, Dispatch, FailJob, Job, Notify, Scheduler, SchedulerSettings, StartWorker, StopWorker,
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
    s.submit(Job("run", "m", client="batch"), 0)
    s.submit(Job("q1", "m", client="batch"), 0)
    s.submit(Job("q2", "m", client="batch"), 0)
    [fail] = s.submit(Job("q3", "m", client="batch"), 0)
    assert isinstance(fail, FailJob) and fail.code is ErrorCode.OVERLOADED and "max_queue" in fail.message
    assert "2 of them yours" in fail.message
    assert "q3" not in s.jobs and s.queue_depths() == {"m": 2}


def test_a_full_queue_still_admits_a_client_with_nothing_queued_up_to_twice_max_queue():
    s = make(max_queue=2)
    ready_worker(s)
    s.submit(Job("run", "m", client="batch"), 0)
    s.submit(Job("q1", "m", client="batch"), 0)
    s.submit(Job("q2", "m", client="batch"), 0)
    [note] = s.submit(Job("cli", "m", client="cli"), 0)
    assert isinstance(note, Notify) and note.position == 1  # and it is next but one
    [fail] = s.submit(Job("cli2", "m", client="cli"), 0)  # now it waits too: refused
    assert fail.code is ErrorCode.OVERLOADED
    s.submit(Job("x", "m", client="x"), 0)
    [fail] = s.submit(Job("y", "m", client="y"), 0)  # the hard bound: 2 x max_queue
    assert fail.code is ErrorCode.OVERLOADED and s.queue_depths() == {"m": 4}


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


@pytest.mark.parametrize("max_retries", [0, 1, 2, 5])
def test_a_job_is_rerun_after_each_crash_until_it_has_used_its_retries(max_retries):
    s = make(max_retries=max_retries)
    wid = ready_worker(s)
    s.submit(Job("j", "m"), 0)
    for crash in range(1, max_retries + 2):
        actions = s.worker_exited(wid, float(crash), "killed by SIGSEGV")
        if crash > max_retries:
            [fail] = [a for a in actions if isinstance(a, FailJob)]
            assert fail.code is ErrorCode.WORKER_CRASHED and "SIGSEGV" in fail.message
            assert f"died {crash} times" in fail.message and "j" not in s.jobs
            return
        # Crashes of ready workers are replaced at once: no backoff however many there are.
        [start] = [a for a in actions if isinstance(a, StartWorker)]
        wid = start.wid
        s.worker_hello(wid)
        assert s.worker_ready(wid, float(crash)) == [Dispatch(wid, "j")]
    raise AssertionError("the job was never failed")


def test_crashed_idle_worker_is_replaced_to_keep_the_model_warm():
    s = make()
    wid = ready_worker(s)
    [start] = s.worker_exited(wid, 5.0, "killed by SIGKILL")
    assert isinstance(start, StartWorker) and start.model == "m"


def test_restart_backoff_grows_and_then_starts():
    s = make()
    [start, _] = s.submit(Job("j", "m"), 0.0)
    [again, ] = s.worker_exited(start.wid, 1.0, "crash at load")  # first: restart at once
    assert isinstance(again, StartWorker)
    assert s.worker_exited(again.wid, 1.2, "crash at load") == []  # second within the window: back off
    due = s.restart_due["m"]
    assert due == pytest.approx(1.2 + 0.5)
    assert s.tick(due - 0.01) == []
    # Regression: the due restart must start, not be postponed again by the same backoff.
    [start] = s.tick(due)
    assert isinstance(start, StartWorker)


def test_more_than_three_load_failures_in_a_minute_fail_queued_requests_with_the_reason():
    s = make()
    actions = s.submit(Job("j", "m"), 0.0)
    wid, now = actions[0].wid, 0.0
    for n in range(4):
        s.worker_hello(wid)
        s.worker_load_failed(wid, "FileNotFoundError: model file /x.gguf does not exist")
        actions = s.worker_exited(wid, now, "exited with code 3")
        if n < 3:
            while not actions:
                now += 0.25
                actions = s.tick(now)
            wid = next(a for a in actions if isinstance(a, StartWorker)).wid
    [fail] = actions
    assert fail.key == "j" and fail.code is ErrorCode.LOAD_FAILED
    assert "more than 3 times" in fail.message and "/x.gguf does not exist" in fail.message
    # While marked failed, new requests fail at once rather than load again...
    [again] = s.submit(Job("k", "m"), now + 1)
    assert again.code is ErrorCode.LOAD_FAILED
    # ...until the cool-down (60 s) has passed.
    assert isinstance(s.submit(Job("l", "m"), now + 60)[0], StartWorker)


def test_a_load_op_retries_a_model_marked_failed_at_once():
    s = Scheduler(SchedulerSettings(), RestartPolicy(RestartSettings(max_load_failures=0)))
    wid = s.submit(Job("j", "m"), 0)[0].wid
    [fail] = s.worker_exited(wid, 0.1, "exited with code 3")
    assert fail.code is ErrorCode.LOAD_FAILED
    assert s.submit(Job("k", "m"), 1)[0].code is ErrorCode.LOAD_FAILED
    [start] = s.load("L", "m", 1)
    assert isinstance(start, StartWorker)
    s.worker_hello(start.wid)
    assert s.worker_ready(start.wid, 2) == [Answer("L")]


def test_load_failure_message_falls_back_to_exit_detail():
    s = Scheduler(SchedulerSettings(), RestartPolicy(RestartSettings(max_load_failures=0)))
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
    assert not s.policy.tripped("m", now)


def test_load_op_answers_when_ready_and_at_once_when_warm():
    s = make()
    [start] = s.load("L1", "m", 0)
    s.worker_hello(start.wid)
    assert s.worker_ready(start.wid, 1) == [Answer("L1")]
    assert s.load("L2", "m", 2) == [Answer("L2")]


def test_a_loads_keep_alive_counts_from_ready_or_at_once_when_warm():
    s = make(idle_timeout=300.0)
    [start] = s.load("L1", "m", 0, keep_alive=5.0)
    s.worker_hello(start.wid)
    assert s.worker_ready(start.wid, 1) == [Answer("L1")]
    assert s.workers[start.wid].idle_deadline == 6.0  # from ready, not the idle timeout
    assert s.load("L2", "m", 2, keep_alive=50.0) == [Answer("L2")]
    assert s.workers[start.wid].idle_deadline == 52.0  # warm: from now
    s.submit(Job("a", "m"), 3.0)  # a request without keep_alive: the idle timeout again
    s.job_done(start.wid, 4.0)
    assert s.workers[start.wid].idle_deadline == 304.0
    assert s.load_keep_alive == {}


def test_a_load_while_busy_outlives_the_running_request_and_a_later_request_replaces_it():
    s = make(idle_timeout=300.0)
    wid = ready_worker(s)
    s.submit(Job("a", "m"), 1.0)  # running, no keep_alive
    assert s.load("L", "m", 2.0, keep_alive=3600.0) == [Answer("L")]
    s.job_done(wid, 3.0)
    assert s.workers[wid].idle_deadline == 3603.0  # the load's, not a's idle timeout
    s.submit(Job("b", "m", keep_alive=10.0), 4.0)
    s.job_done(wid, 5.0)
    assert s.workers[wid].idle_deadline == 15.0


def test_a_failed_loads_keep_alive_is_not_left_for_a_later_worker():
    s = make(idle_timeout=300.0)
    [start] = s.load("L", "m", 0.0, keep_alive=0.0)
    assert s.load_keep_alive == {"m": 0.0}
    s._fail_waiting("m", ErrorCode.LOAD_FAILED, "it failed")
    assert s.load_keep_alive == {}


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
    [start] = s.load("L0", "m", 1.0)
    [again] = s.worker_exited(start.wid, 1.0, "crash at load")
    s.worker_exited(again.wid, 1.2, "crash at load")  # second failed load: a restart is due, not started
    assert "m" in s.restart_due
    s.submit(Job("j", "m"), 1.3)
    assert s.unload("U", "m", 1.4) == [Answer("U")]  # no worker to stop...
    [start] = s.tick(s.restart_due["m"])  # ...and the waiting work still gets its worker
    s.worker_hello(start.wid)
    assert s.worker_ready(start.wid, 3.0) == [Answer("L0"), Dispatch(start.wid, "j")]


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
    # A request still gets a worker at once: only keeping it warm stopped.
    assert any(isinstance(a, StartWorker) for a in s.submit(Job("j", "m"), now))


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


def test_an_unloading_worker_that_crashes_is_replaced_only_for_the_work_it_leaves():
    s = make()
    wid = ready_worker(s)
    s.submit(Job("j", "m"), 0)
    s.unload("U", "m", 1)
    actions = s.worker_exited(wid, 2, "killed by SIGKILL")
    # Unloaded as asked; its job (to be resumed) needs the model, so a worker starts for it.
    assert actions[0] == Answer("U") and isinstance(actions[1], StartWorker)
    assert list(s.queues["m"]) == ["j"]

    s = make()
    wid = ready_worker(s)
    s.unload("U", "m", 1)
    assert s.worker_exited(wid, 2, "killed by SIGKILL") == [Answer("U")]  # nothing waits: not kept warm


def test_a_tripped_model_with_a_healthy_worker_still_serves_and_fails_what_waits_once_it_is_gone():
    from stoker.supervisor.scheduler import ModelLimits

    s = Scheduler(SchedulerSettings(max_queue=8),
                  RestartPolicy(RestartSettings(max_load_failures=0, window_s=60, cooldown_s=60)),
                  limits={"m": ModelLimits(replicas=2)})
    [w1] = [a for a in s.submit(Job("j1", "m"), 0.0) if isinstance(a, StartWorker)]
    [w2] = [a for a in s.submit(Job("j2", "m"), 0.0) if isinstance(a, StartWorker)]
    s.worker_hello(w1.wid)
    s.worker_ready(w1.wid, 0.5)  # runs j1
    assert s.worker_exited(w2.wid, 1.0, "load failed") == []  # the replica's failure trips it ...
    assert s.policy.tripped("m", 1.0)
    assert s.job_done(w1.wid, 2.0) == [Dispatch(w1.wid, "j2")]  # ... but the loaded worker serves j2
    assert s.submit(Job("j3", "m"), 2.5) == [Notify("j3", loading=False, position=0)]
    # the last worker dies: nothing may start, so what waits fails instead of waiting for ever
    actions = s.worker_exited(w1.wid, 3.0, "killed by SIGKILL")
    assert {a.key for a in actions if isinstance(a, FailJob)} == {"j2", "j3"}
    assert all(a.code is ErrorCode.LOAD_FAILED for a in actions if isinstance(a, FailJob))
    assert not s.jobs and not s.queues["m"]
