"""Typed result payloads: what the supervisor builds is what clients read, key for key."""

from stoker.protocol.results import (
    BudgetUse, MemoryInfo, ModelInfo, Models, Status, SupervisorInfo, WorkerInfo,
)


def test_status_round_trips_and_tolerates_newer_and_older_supervisors():
    st = Status(SupervisorInfo(7, "0.1.0", "ipc:///x", 1.5, "running", False),
                [WorkerInfo("w1", None, "m", "idle", 10, 0, 2.0, 3, 100, 0, True, False)],
                {"m": 2}, MemoryInfo(BudgetUse(1000, 100, 900), BudgetUse(None, 0, None), ["n"], []))
    data = st.to_data()
    assert data["workers"][0]["pid"] is None and data["memory"]["vram"]["budget"] is None
    assert Status.from_data(data) == st
    data["workers"][0]["new_key"] = 1  # a newer supervisor
    del data["memory"]  # an older one
    again = Status.from_data(data)
    assert again.memory is None and again.workers == st.workers


def test_models_leave_out_a_problem_there_is_not():
    ok = ModelInfo("a", "fake", "", 0, False, 0, 2048, 0)
    bad = ModelInfo("b", "llama", "/x.gguf", 0, False, 0, 2048, 0, problem="not a regular file")
    data = Models("a", [ok, bad]).to_data()
    assert "problem" not in data["models"][0] and data["models"][1]["problem"] == "not a regular file"
    assert Models.from_data(data) == Models("a", [ok, bad])
