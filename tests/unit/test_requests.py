"""A generate request's life (supervisor/requests.py), event by event, with no processes or sockets.

Each test follows one path the integration tests cover with real processes: what the client
hears, what the worker is told, and when the request is forgotten.
"""

import pytest

from stoker.protocol.messages import ErrorCode, InfoState, Key, Reason
from stoker.protocol.validation import GenerateRequest
from stoker.protocol.messages import Op
from stoker.supervisor.requests import (
    CancelOnWorker, Forget, Reply, RequestState, Requests, RunOnWorker, Unqueue,
)
from stoker.supervisor.states import InvalidTransition

C = b"\x00client"


def gen(rid="g", max_tokens=10, **kw) -> GenerateRequest:
    return GenerateRequest(op=Op.GENERATE, id=rid, prompt="hi", sampling={Key.MAX_TOKENS: max_tokens}, **kw)


def accepted(rs: Requests, rid="g", max_tokens=10, now=0.0, **kw):
    return rs.accept(C, gen(rid, max_tokens, **kw), "m", max_tokens, now)


def replies(actions, client: bytes = C) -> list[dict]:
    """The messages replied, each checked to go to `client` and to name a request."""
    out = []
    for a in actions:
        if isinstance(a, Reply):
            assert a.client == client and a.message["id"] is not None, a
            out.append(a.message)
    return out


def forgotten(actions) -> tuple[str, dict]:
    """The outcome and timings the last action (a Forget) logs."""
    forget = actions[-1]
    assert isinstance(forget, Forget) and forget.request is not None, actions
    assert set(forget.timings) == {"queued_ms", "load_ms", "ttft_ms", "total_ms"}
    return forget.outcome, forget.timings


def kinds(actions) -> list[str]:
    return [type(a).__name__ for a in actions]


def running(rs: Requests, rid="g", wid="w1", **kw):
    req = accepted(rs, rid, **kw)
    rs.dispatched(req.key, wid, 0.1, 0.0)
    return req


def test_a_request_is_answered_at_once_then_runs_streams_and_ends():
    rs = Requests("inst")
    req = accepted(rs, now=10.0)
    [info] = replies(rs.acknowledge(req.key))
    assert info["ev"] == "info" and info["state"] == InfoState.LOADING.value
    assert info["instance"] == "inst" and info["session"] == f"inst/{C.hex()}" and info["model"] == "m"
    assert rs.acknowledge(req.key) == []  # once
    actions = rs.dispatched(req.key, "w1", 10.5, 120.0)
    assert replies(actions)[0]["state"] == InfoState.RUNNING.value
    assert replies(actions)[0]["id"] == "g"
    [run] = [a for a in actions if isinstance(a, RunOnWorker)]
    assert run.wid == "w1" and run.job_no == req.job_no and run.resume is None
    assert run.body[Key.PROMPT] == "hi" and run.body[Key.MAX_TOKENS] == 10
    assert req.state is RequestState.RUNNING and req.load_ms == 120.0
    rs.tokens(req, "a", 1, 10.6)
    rs.tokens(req, "bc", 2, 10.7)
    [frame] = replies(rs.flush())  # read together: one frame
    assert frame["id"] == "g"
    assert (frame["seq"], frame["n"], frame["text"]) == (0, 3, "abc")
    assert rs.flush() == []
    rs.tokens(req, "d", 1, 10.8)
    actions = rs.ended(req, Reason.STOP, 4, 11.0)
    tok, end = replies(actions)
    assert (tok["seq"], tok["text"]) == (3, "d")  # its last tokens go before its end
    assert end["ev"] == "end" and end["reason"] == "stop"
    assert end["usage"] == {"prompt_tokens": 4, "completion_tokens": 4}
    assert end["id"] == "g"
    assert end["timings"] == {"queued_ms": 500.0, "load_ms": 120.0, "ttft_ms": 600.0, "total_ms": 1000.0}
    outcome, t = forgotten(actions)
    assert outcome == "stop" and t == end["timings"]
    assert req.key not in rs and len(rs) == 0 and req.state is RequestState.ENDED
    assert rs.on_worker(req.job_no, "w1") is None  # anything late is dropped


def test_an_info_already_sent_is_the_acknowledgement():
    rs = Requests("inst")
    req = accepted(rs)
    [queued] = replies(rs.notify(req.key, loading=False, position=3))
    assert queued["state"] == "queued" and queued["position"] == 3
    assert rs.acknowledge(req.key) == []


def test_crash_before_the_first_token_reruns_it_from_the_start():
    rs = Requests("inst")
    req = running(rs)
    assert rs.worker_exited("w1", 1.0) == []
    assert req.state is RequestState.RESUMING and req.worker is None
    actions = rs.dispatched(req.key, "w2", 2.0, 0.0)
    assert replies(actions) == []  # no second `running`
    [run] = actions
    assert run.wid == "w2" and run.resume is None and run.body[Key.MAX_TOKENS] == 10


def test_crash_after_tokens_resumes_from_what_the_client_has():
    rs = Requests("inst")
    req = running(rs, max_tokens=10)
    rs.tokens(req, "one two", 2, 0.2)
    rs.tokens(req, " three", 1, 0.3)  # read, not yet flushed, when the worker died
    actions = rs.worker_exited("w1", 1.0)
    [frame] = replies(actions)
    assert (frame["seq"], frame["n"]) == (0, 3)
    assert req.state is RequestState.RESUMING
    [run] = rs.dispatched(req.key, "w2", 2.0, 0.0)
    assert run.resume == "one two three" and run.body[Key.MAX_TOKENS] == 7
    rs.tokens(req, " four", 1, 2.1)
    tok, end = replies(rs.ended(req, Reason.LENGTH, 4, 3.0))
    assert tok["seq"] == 3  # the stream goes on where it stood
    assert end["usage"]["completion_tokens"] == 4
    assert end["timings"]["queued_ms"] == 100.0  # the first wait, not the resume's


def test_a_continuation_after_a_supervisor_restart_starts_where_the_client_stood():
    rs = Requests("new")
    req = accepted(rs, max_tokens=10, resume_text="so far", resume_tokens=4)
    [_, run] = rs.dispatched(req.key, "w1", 0.1, 0.0)
    assert run.resume == "so far" and run.body[Key.MAX_TOKENS] == 6
    rs.tokens(req, "!", 1, 0.2)
    [frame] = replies(rs.flush())
    assert frame["seq"] == 4


def test_cancel_of_a_queued_request_ends_it_without_a_worker():
    rs = Requests("inst")
    req = accepted(rs)
    found, actions = rs.cancel(req.key, 1.0)
    assert found
    assert actions[0] == Unqueue(req.key)
    [end] = replies(actions)
    assert end["ev"] == "end" and end["reason"] == "cancelled" and end["usage"]["completion_tokens"] == 0
    assert isinstance(actions[-1], Forget) and req.key not in rs
    assert rs.cancel(req.key, 1.0) == (False, [])  # gone; and an unknown target is not found
    assert rs.cancel((C, "never"), 1.0) == (False, [])


def test_cancel_of_a_running_request_tells_its_worker_once_and_ends_with_its_end():
    rs = Requests("inst")
    req = running(rs)
    found, actions = rs.cancel(req.key, 1.0)
    assert found and actions == [CancelOnWorker("w1", req.job_no)]
    assert req.state is RequestState.CANCELLING
    assert rs.cancel(req.key, 1.1) == (True, [])  # told already
    rs.tokens(req, "x", 1, 1.2)  # it was still generating: the client gets it
    tok, end = replies(rs.ended(req, Reason.CANCELLED, 2, 1.3))
    assert tok["text"] == "x" and end["reason"] == "cancelled"


def test_cancel_racing_the_end_the_worker_reached_first():
    """The worker finished before it read the cancel: its end stands, and the cancel it reads
    later finds nothing (a late message for a forgotten job is dropped)."""
    rs = Requests("inst")
    req = running(rs)
    _, actions = rs.cancel(req.key, 1.0)
    assert kinds(actions) == ["CancelOnWorker"]
    [end] = replies(rs.ended(req, Reason.LENGTH, 2, 1.1))
    assert end["reason"] == "length"
    assert rs.on_worker(req.job_no, "w1") is None


def test_a_cancelled_request_whose_worker_dies_ends_and_is_not_resumed():
    rs = Requests("inst")
    req = running(rs)
    rs.cancel(req.key, 1.0)
    assert rs.cancelling_on("w1") == {req.key}
    actions = rs.worker_exited("w1", 1.5)
    [end] = replies(actions)
    assert end["reason"] == "cancelled" and isinstance(actions[-1], Forget)
    assert req.key not in rs


def test_client_gone_with_requests_queued_and_running():
    """Its pipe was full, then it left: nothing more is sent to it, queued work is dropped and
    running work is stopped; what the worker still sends goes nowhere."""
    rs = Requests("inst")
    run = running(rs, "run")
    rs.tokens(run, "unsent", 1, 0.2)
    queued = accepted(rs, "queued")
    other = rs.accept(b"other", gen("o"), "m", 10, 0.0)
    actions = rs.client_gone(C, 1.0)
    assert replies(actions) == []
    assert Unqueue(queued.key) in actions and CancelOnWorker("w1", run.job_no) in actions
    assert queued.key not in rs and other.key in rs
    assert run.state is RequestState.CANCELLING and run.silent
    rs.tokens(run, "more", 1, 1.1)
    assert rs.flush() == []
    actions = rs.ended(run, Reason.CANCELLED, 2, 1.2)
    assert replies(actions) == [] and isinstance(actions[-1], Forget)
    assert run.key not in rs


def test_client_gone_while_its_request_resumes_drops_it():
    rs = Requests("inst")
    req = running(rs)
    rs.worker_exited("w1", 1.0)
    assert rs.client_gone(C, 1.1)[0] == Unqueue(req.key)
    assert req.key not in rs


def test_a_deadline_ends_a_queued_request_with_timeout():
    rs = Requests("inst")
    req = accepted(rs, deadline=2.0)
    assert rs.next_deadline() == 2.0
    assert rs.deadlines_due(1.9) == []
    actions = rs.deadlines_due(2.0)
    assert actions[0] == Unqueue(req.key)
    [err] = replies(actions)
    assert err["ev"] == "error" and err["code"] == "timeout" and "deadline of 2 s" in err["message"]
    assert req.key not in rs


def test_a_deadline_answers_a_running_request_and_stops_its_worker():
    rs = Requests("inst")
    req = running(rs, deadline=1.0)
    rs.tokens(req, "a", 1, 0.5)
    actions = rs.deadlines_due(1.0)
    tok, err = replies(actions)
    assert tok["text"] == "a" and err["code"] == "timeout" and "1 tokens sent" in err["message"]
    assert CancelOnWorker("w1", req.job_no) in actions
    assert req.key in rs  # until its worker has stopped
    rs.tokens(req, "late", 1, 1.1)
    actions = rs.ended(req, Reason.CANCELLED, 2, 1.2)
    assert replies(actions) == []  # nothing follows the terminal reply
    assert actions[-1].outcome == "timeout"


def test_a_request_being_cancelled_ends_cancelled_even_if_its_deadline_passes_meanwhile():
    rs = Requests("inst")
    req = running(rs, deadline=1.0)
    found, actions = rs.cancel(req.key, 0.5)
    assert found and CancelOnWorker("w1", req.job_no) in actions
    assert rs.deadlines_due(1.0) == []  # its end is on its way: no timeout error before it
    [end] = replies(rs.ended(req, Reason.CANCELLED, 2, 1.2))
    assert end["ev"] == "end" and end["reason"] == "cancelled"


def test_a_deadline_is_not_kept_by_a_reused_id():
    rs = Requests("inst")
    first = accepted(rs, deadline=1.0)
    rs.cancel(first.key, 0.5)
    again = accepted(rs)  # the same id, no deadline
    assert rs.deadlines_due(5.0) == [] and again.key in rs


def test_shutdown_fails_everything_in_flight():
    rs = Requests("inst")
    a = running(rs, "a")
    b = accepted(rs, "b")
    actions = rs.shutdown(9.0)
    errs = replies(actions)
    assert {e["id"] for e in errs} == {"a", "b"} and {e["code"] for e in errs} == {"shutting_down"}
    assert len(rs) == 0 and a.state is b.state is RequestState.ENDED
    assert rs.fail(a.key, ErrorCode.SHUTTING_DOWN, "again", 9.5) == []  # the scheduler's late FailJob


def test_a_worker_error_ends_the_request_with_it():
    rs = Requests("inst")
    req = running(rs)
    [err] = replies(rs.fail(req.key, ErrorCode.BAD_REQUEST, "no", 1.0))
    assert err["code"] == "bad_request" and err["message"] == "no"


def test_abandon_running_answers_internal_and_stops_the_worker():
    rs = Requests("inst")
    req = running(rs)
    actions = rs.abandon(req.key, ErrorCode.INTERNAL, "bug", 1.0)
    assert replies(actions)[0]["code"] == "internal"
    assert CancelOnWorker("w1", req.job_no) in actions


def test_a_silent_request_gets_no_info():
    rs = Requests("inst")
    req = running(rs)
    rs.client_gone(C, 1.0)
    assert rs.notify(req.key, loading=True) == []


def test_impossible_transitions_are_refused():
    rs = Requests("inst")
    req = running(rs)
    rs.cancel(req.key, 1.0)
    with pytest.raises(InvalidTransition):
        rs.dispatched(req.key, "w2", 2.0, 0.0)  # a request its worker was told to stop never runs again
    req2 = accepted(rs, "q")
    with pytest.raises(InvalidTransition):
        req2.to(RequestState.CANCELLING)  # only a request on a worker is cancelled there


def test_messages_from_a_worker_that_no_longer_runs_the_request_are_late():
    rs = Requests("inst")
    req = running(rs)
    assert rs.on_worker(req.job_no, "w1") is req
    rs.worker_exited("w1", 1.0)
    assert rs.on_worker(req.job_no, "w1") is None
    rs.dispatched(req.key, "w2", 1.5, 0.0)
    assert rs.on_worker(req.job_no, "w1") is None and rs.on_worker(req.job_no, "w2") is req


def test_every_way_a_request_ends_is_logged_with_its_outcome():
    rs = Requests("inst")
    q = accepted(rs, "q", now=5.0)
    _, actions = rs.cancel(q.key, 6.0)
    [end] = replies(actions)
    assert end["id"] == "q" and end["usage"] == {"prompt_tokens": 0, "completion_tokens": 0}
    assert end["timings"]["total_ms"] == 1000.0
    assert forgotten(actions)[0] == "cancelled"
    gone = accepted(rs, "gone")
    assert forgotten(rs.client_gone(C, 1.0))[0] == "client_gone"
    assert gone.key not in rs
    failed = running(rs, "f")
    actions = rs.fail(failed.key, ErrorCode.LOAD_FAILED, "bad file", 2.0)
    [err] = replies(actions)
    assert (err["id"], err["code"], err["message"]) == ("f", "load_failed", "bad file")
    assert forgotten(actions)[0] == "load_failed"
    c = running(rs, "c", wid="w9")
    rs.tokens(c, "x", 1, 0.5)
    rs.flush()
    rs.cancel(c.key, 1.0)
    actions = rs.worker_exited("w9", 2.0)
    [end] = replies(actions)
    assert end["id"] == "c" and end["reason"] == "cancelled"
    assert end["usage"] == {"prompt_tokens": 0, "completion_tokens": 1}
    assert forgotten(actions)[0] == "cancelled"
    accepted(rs, "s")
    [err] = replies(rs.shutdown(3.0))
    assert err["id"] == "s" and err["message"] == "the supervisor shut down before this request finished"


def test_only_the_dead_workers_requests_are_affected():
    rs = Requests("inst")
    a = running(rs, "a", wid="w1")
    b = running(rs, "b", wid="w2")
    rs.cancel(a.key, 1.0)
    rs.cancel(b.key, 1.0)
    assert rs.cancelling_on("w1") == {a.key}
    assert rs.worker_exited("w1", 2.0)[-1].request is a
    assert b.key in rs and b.state is RequestState.CANCELLING
    c = running(rs, "c", wid="w3")
    rs.worker_exited("w1", 2.5)
    assert c.state is RequestState.RUNNING


def test_chat_messages_reach_the_worker_and_nothing_is_left_to_generate_after_a_full_resume():
    rs = Requests("inst")
    chat = rs.accept(C, GenerateRequest(op=Op.GENERATE, id="chat", messages=({"role": "user", "content": "hi"},)),
                     "m", 5, 0.0)
    [_, run] = rs.dispatched(chat.key, "w1", 0.1, 0.0)
    assert run.body[Key.MESSAGES] == [{"role": "user", "content": "hi"}] and Key.PROMPT not in run.body
    full = accepted(rs, "full", max_tokens=4, resume_text="done", resume_tokens=4)
    [_, run] = rs.dispatched(full.key, "w2", 0.1, 0.0)
    assert run.body[Key.MAX_TOKENS] == 0


def test_deadlines_of_ended_requests_are_pruned_but_live_ones_kept():
    rs = Requests("inst")
    live = accepted(rs, "live", deadline=50.0)
    for i in range(1100):
        r = accepted(rs, i, deadline=100.0)
        rs.cancel(r.key, 0.0)
    accepted(rs, "last", deadline=60.0)  # an accept past the bound prunes
    assert len(rs.deadlines) < 1000
    assert [d[2] for d in rs.deadlines].count(live.key) == 1
    assert rs.next_deadline() == 50.0
    assert replies(rs.deadlines_due(50.0))[0]["id"] == "live"


def test_requests_iterate_and_look_up():
    rs = Requests("inst")
    a, b = accepted(rs, "a"), accepted(rs, "b")
    assert list(rs) == [a, b] and rs.get(a.key) is a and rs.get((C, "zz")) is None
    assert a.job_no != b.job_no
    assert rs.on_worker(12345, "w1") is None
