"""Fair turns between clients, priorities, and the positions `info` reports."""

import pytest
from hypothesis import given, strategies as st

from stoker.supervisor.fair_queue import FairQueue


def drain(q: FairQueue) -> list:
    out = []
    while q:
        out.append(q.pop())
    return out


def test_clients_take_turns_and_keep_their_own_order():
    q = FairQueue()
    for i in range(5):
        q.push(f"batch{i}", "batch")
    q.push("you0", "you")
    q.push("you1", "you")
    assert drain(q) == ["batch0", "you0", "batch1", "you1", "batch2", "batch3", "batch4"]


def test_a_newcomer_waits_for_at_most_one_request_per_other_client():
    q = FairQueue()
    for i in range(10_000):
        q.push(("batch", i), "batch")
    q.push("interactive", "cli")
    assert q.position("interactive") == 1
    assert q.pop() == ("batch", 0) and q.pop() == "interactive"


def test_higher_priority_first_then_turns():
    q = FairQueue()
    q.push("low", "a", priority=-1)
    q.push("a0", "a")
    q.push("b0", "b")
    q.push("urgent", "b", priority=5)
    assert q.position("urgent") == 0 and q.position("low") == 3
    assert drain(q) == ["urgent", "a0", "b0", "low"]


def test_put_back_requests_go_before_everything():
    q = FairQueue()
    q.push("a", "x", priority=9)
    q.push_front("resumed")
    assert q.position("resumed") == 0 and q.position("a") == 1
    assert drain(q) == ["resumed", "a"]


def test_remove_and_contains():
    q = FairQueue()
    q.push("a", "x")
    q.push("b", "x")
    q.push_front("r")
    q.remove("a")
    q.remove("r")
    assert "a" not in q and "b" in q and len(q) == 1
    assert drain(q) == ["b"]
    with pytest.raises(IndexError):
        q.pop()


@given(st.lists(st.tuples(st.sampled_from("abcd"), st.integers(-1, 1), st.booleans()), max_size=40))
def test_iteration_positions_and_pops_agree(ops):
    q = FairQueue()
    for i, (client, priority, front) in enumerate(ops):
        if front:
            q.push_front(i)
        else:
            q.push(i, client, priority)
    order = list(q)
    assert sorted(order) == list(range(len(ops)))
    assert [q.position(k) for k in order] == list(range(len(order)))
    assert drain(q) == order


def test_count_per_client():
    q = FairQueue()
    q.push("a", "x")
    q.push("b", "x", priority=3)
    q.push("c", "y")
    q.push_front("r")
    assert (q.count("x"), q.count("y"), q.count("z")) == (2, 1, 0)
    q.remove("b")
    assert q.pop() == "r" and q.pop() == "a"
    assert (q.count("x"), q.count("y")) == (0, 1)
