from stoker.supervisor.restart_policy import RestartPolicy, RestartSettings


def test_no_failures_no_delay():
    assert RestartPolicy().delay("m", 0) == 0


def test_first_failure_restarts_at_once_then_backoff_doubles_up_to_the_cap():
    p = RestartPolicy(RestartSettings(backoff_initial_s=0.5, backoff_max_s=4, window_s=60))
    delays = []
    for i in range(6):
        p.record_crash("m", float(i))
        delays.append(p.delay("m", float(i)))
    assert delays == [0, 0.5, 1.0, 2.0, 4.0, 4.0]
    assert p.delay("m", 70.0) == 0


def test_gives_up_at_three_load_failures_within_the_window_only():
    p = RestartPolicy()
    p.record_load_failure("m", 0, "a")
    p.record_load_failure("m", 30, "b")
    assert not p.gave_up("m", 30)
    p.record_load_failure("m", 59, "c")
    assert p.gave_up("m", 59)
    assert "3 times" in p.give_up_message("m", 59) and "last error: c" in p.give_up_message("m", 59)
    assert not p.gave_up("m", 60.5)  # the first one left the window
    assert not p.gave_up("other", 59)


def test_crashes_after_load_do_not_count_as_load_failures():
    p = RestartPolicy()
    for t in range(5):
        p.record_crash("m", t)
    assert not p.gave_up("m", 5)
