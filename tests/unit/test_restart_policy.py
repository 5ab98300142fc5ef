"""The crash-loop breaker and the backoff between restarts, with no processes."""

from stoker.supervisor.restart_policy import RestartPolicy, RestartSettings


def test_no_failures_no_delay():
    assert RestartPolicy().delay("m", 0) == 0


def test_first_load_failure_restarts_at_once_then_backoff_doubles_up_to_the_cap():
    p = RestartPolicy(RestartSettings(backoff_initial_s=0.5, backoff_max_s=4, window_s=60, max_load_failures=99))
    delays = []
    for i in range(6):
        p.record_load_failure("m", float(i), "boom")
        delays.append(p.delay("m", float(i)))
    assert delays == [0, 0.5, 1.0, 2.0, 4.0, 4.0]
    assert p.delay("m", 70.0) == 0  # they all left the window


def test_trips_on_more_than_max_load_failures_within_the_window_only():
    p = RestartPolicy(RestartSettings(max_load_failures=3, window_s=60, cooldown_s=100))
    for t, why in ((0, "a"), (30, "b"), (59, "c")):
        p.record_load_failure("m", t, why)
    assert not p.tripped("m", 59)  # three is not more than three
    p.record_load_failure("m", 61, "d")  # the one at 0 has left the window: still three
    assert not p.tripped("m", 61)
    p.record_load_failure("m", 62, "e")
    assert p.tripped("m", 62)
    msg = p.tripped_message("m", 62)
    assert "more than 3 times in 60 s" in msg and "last error: e" in msg and "in 100 s" in msg
    assert "stoker load m" in msg
    assert not p.tripped("other", 62)


def test_after_the_cooldown_one_more_load_is_tried_and_one_failure_trips_again():
    p = RestartPolicy(RestartSettings(max_load_failures=1, window_s=60, cooldown_s=10))
    p.record_load_failure("m", 0, "a")
    p.record_load_failure("m", 1, "b")
    assert p.tripped("m", 10.9)
    assert not p.tripped("m", 11)  # cooled down: half open
    assert p.delay("m", 11) == 0
    p.record_load_failure("m", 12, "c")
    assert p.tripped("m", 12)  # at once, not after another max_load_failures


def test_a_good_load_after_the_cooldown_closes_the_breaker():
    p = RestartPolicy(RestartSettings(max_load_failures=1, window_s=60, cooldown_s=10))
    p.record_load_failure("m", 0, "a")
    p.record_load_failure("m", 1, "b")
    assert not p.tripped("m", 11)
    p.record_loaded("m")
    p.record_load_failure("m", 12, "c")
    assert not p.tripped("m", 12)


def test_reset_retries_a_tripped_model_at_once():
    p = RestartPolicy(RestartSettings(max_load_failures=1))
    p.record_load_failure("m", 0, "a")
    p.record_load_failure("m", 1, "b")
    assert p.tripped("m", 2)
    p.reset("m")
    assert not p.tripped("m", 2) and p.delay("m", 2) == 0


def test_crashes_of_ready_workers_neither_trip_nor_delay():
    p = RestartPolicy()
    for t in range(10):
        p.record_crash("m", t)
    assert not p.tripped("m", 10) and p.delay("m", 10) == 0
    assert p.recent_crashes("m", 10) == 10
    assert p.recent_crashes("m", 100) == 0
