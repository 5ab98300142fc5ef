"""ClientCore: which requests a restarted (or reconnected) supervisor lost, and how they go on."""

from __future__ import annotations

import msgpack
import pytest

from stoker.protocol import messages as m
from stoker.protocol.client_core import MAX_RESENDS, ClientCore
from stoker.protocol.errors import BadRequest, Timeout, Unreachable
from stoker.protocol.messages import InfoState, Op, Reason

OLD, NEW = "aaaa/01", "bbbb/02"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def frame(msg: dict) -> bytes:
    return msgpack.packb(msg)


def sent(raw: bytes) -> dict:
    return msgpack.unpackb(raw)


def pong(core: ClientCore, rid, session: str = NEW, instance: str = "bbbb"):
    return core.receive(frame(m.result(rid, {"pong": True, "version": "x", "instance": instance,
                                             "session": session})))


def started_stream(core: ClientCore, session: str = OLD, **keys):
    """A generate acknowledged on `session` that got two tokens ("Hello" and " world")."""
    rid, _ = core.request(Op.GENERATE, {"prompt": "p", "max_tokens": 10, **keys})
    core.receive(frame(m.info(rid, InfoState.RUNNING, session=session, instance=session[:4], model="gemma")))
    core.receive(frame(m.token(rid, 0, 1, "Hello")))
    core.receive(frame(m.token(rid, 1, 1, " world")))
    return rid


def test_a_stream_acknowledged_by_a_session_that_is_gone_is_sent_again_as_a_continuation():
    core = ClientCore()
    rid = started_stream(core, seed=3)
    core.disconnected()
    ping, _ = core.probe()
    step = pong(core, ping)
    assert step.replies == []  # the probe's own result goes to nobody
    [(again, raw)] = step.send
    assert again == rid
    msg = sent(raw)
    assert msg["id"] == rid and msg["op"] == "generate" and msg["prompt"] == "p" and msg["seed"] == 3
    assert msg["resume"] == {"text": "Hello world", "tokens": 2}
    assert msg["model"] == "gemma"  # the model it ran on, not whatever the new default is
    assert msg["max_tokens"] == 10  # the supervisor takes what the client already has off it
    # The continuation streams on, and the core keeps counting from where it was.
    core.receive(frame(m.info(rid, InfoState.RUNNING, session=NEW)))
    core.receive(frame(m.token(rid, 2, 1, "!")))
    assert core.pending[rid].tokens == 3 and "".join(core.pending[rid].texts) == "Hello world!"


def test_requests_the_new_session_knows_or_sent_after_the_ping_are_left_alone():
    core = ClientCore()
    alive = started_stream(core, session=NEW)
    ping, _ = core.probe()
    later, _ = core.request(Op.GENERATE, {"prompt": "after the ping"})
    assert pong(core, ping).send == []
    assert core.in_flight(alive) and core.in_flight(later)


def test_a_request_with_no_reply_before_the_ping_result_is_lost_and_sent_again_as_it_was():
    core = ClientCore()
    rid, first = core.request(Op.GENERATE, {"prompt": "p", "max_tokens": 4})
    status, _ = core.request(Op.STATUS, {})
    ping, _ = core.probe()
    step = pong(core, ping)
    assert [r for r, _ in step.send] == [rid, status]
    assert sent(step.send[0][1]) == sent(first)  # nothing streamed yet: the very same request


def test_a_generate_with_its_info_before_the_ping_is_not_lost_on_the_same_session():
    core = ClientCore()
    rid, _ = core.request(Op.GENERATE, {"prompt": "p"})
    ping, _ = core.probe()
    core.receive(frame(m.info(rid, InfoState.QUEUED, position=3, session=NEW)))
    assert pong(core, ping).send == []


def test_an_info_from_a_new_session_shows_the_loss_without_a_ping():
    core = ClientCore()
    old = started_stream(core, session=OLD)
    new, _ = core.request(Op.GENERATE, {"prompt": "q"})
    step = core.receive(frame(m.info(new, InfoState.RUNNING, session=NEW)))
    assert [r for r, _ in step.send] == [old]


def test_loads_are_sent_again_unless_sent_on_the_session_that_answers():
    core = ClientCore()
    ping, _ = core.probe()
    pong(core, ping, session=OLD)  # the session is known now
    load, _ = core.request(Op.LOAD, {"model": "m"})
    ping, _ = core.probe()
    assert pong(core, ping, session=OLD).send == []  # a load is answered later: still running
    ping, _ = core.probe()
    [(again, raw)] = pong(core, ping, session=NEW).send
    assert again == load and sent(raw)["model"] == "m"


def test_a_lost_shutdown_is_not_sent_to_the_new_supervisor():
    core = ClientCore()
    rid, _ = core.request(Op.SHUTDOWN, {})
    ping, _ = core.probe()
    step = pong(core, ping)
    assert step.send == [] and step.replies == [(rid, m.result(rid, {"stopping": True}))]


def test_a_lost_cancel_ends_its_lost_target_as_cancelled():
    core = ClientCore()
    target = started_stream(core)
    cancel, _ = core.request(Op.CANCEL, {"target": target})
    core.disconnected()
    ping, _ = core.probe()
    step = pong(core, ping)
    assert step.send == []
    replies = dict(step.replies)
    assert replies[cancel]["data"] == {"cancelled": True}
    assert replies[target]["ev"] == "end" and replies[target]["reason"] == Reason.CANCELLED.value
    assert replies[target]["usage"]["completion_tokens"] == 2
    assert not core.in_flight(target)


def test_a_request_lost_again_and_again_ends_unreachable():
    core = ClientCore()
    rid, _ = core.request(Op.GENERATE, {"prompt": "p"})
    for i in range(MAX_RESENDS):
        ping, _ = core.probe()
        assert [r for r, _ in pong(core, ping, session=f"s/{i}").send] == [rid]
    ping, _ = core.probe()
    [(who, error)] = pong(core, ping, session="s/last").replies
    assert who == rid and isinstance(error, Unreachable) and not core.in_flight(rid)


def test_a_deadline_goes_on_with_what_is_left_of_it():
    clock = Clock()
    core = ClientCore(clock)
    rid = started_stream(core, deadline=10.0)
    clock.now += 4
    ping, _ = core.probe()
    [(_, raw)] = pong(core, ping).send
    assert sent(raw)["deadline"] == pytest.approx(6.0)
    clock.now += 7  # past it
    ping, _ = core.probe()
    [(who, error)] = pong(core, ping, session="cccc/03").replies
    assert who == rid and isinstance(error, Timeout)


def test_quiet_requests_and_unknown_ids_deliver_nothing():
    core = ClientCore()
    quiet, _ = core.request(Op.CANCEL, {"target": 99}, quiet=True)
    assert core.receive(frame(m.result(quiet, {"cancelled": False}))).replies == []
    assert core.receive(frame(m.result(12345, {}))).replies == []
    assert core.receive(frame(m.error(None, m.ErrorCode.BAD_REQUEST, "x"))).replies == []
    rid, _ = core.request(Op.STATUS, {})
    [(who, msg)] = core.receive(frame(m.result(rid, {"a": 1}))).replies
    assert who == rid and not core.in_flight(rid)


def test_a_lost_cancel_of_a_stream_the_supervisor_still_has_is_sent_again():
    core = ClientCore()
    target = started_stream(core, session=NEW)
    cancel, raw = core.request(Op.CANCEL, {"target": target})
    ping, _ = core.probe()
    step = pong(core, ping)
    assert step.send == [(cancel, raw)] and step.replies == [] and core.in_flight(target)


def test_a_probe_lost_with_its_connection_is_replaced_keeping_its_sending_time():
    clock = Clock()
    core = ClientCore(clock=clock)
    first, _ = core.probe()
    assert core.probe() is None  # one in flight
    clock.now += 3
    core.disconnected()  # the ping went with the connection: no answer can come
    replaced = core.probe()
    assert replaced is not None and replaced[0] != first
    assert core.probe_sent == 100.0  # the supervisor has had 3 s already, not 0
    assert not core.in_flight(first)
    pong(core, replaced[0])
    assert core.probing is None
    clock.now += 1
    core.probe()
    assert core.probe_sent == 104.0  # a later probe counts from its own sending


def test_a_request_over_the_supervisors_limit_is_refused_before_it_is_sent():
    """Past twice max_message_bytes libzmq closes the connection: sent again after each
    reconnect, one such request would take everything in flight down with it, again and again."""
    core = ClientCore(clock=Clock())
    rid, _ = core.probe()
    core.receive(frame(m.result(rid, {"pong": True, "version": "x", "instance": "bbbb", "session": NEW,
                                      "max_message_bytes": 2048})))
    assert core.max_message_bytes == 2048
    small, _ = core.request(Op.GENERATE, {"prompt": "x" * 1000})
    with pytest.raises(BadRequest) as err:
        core.request(Op.GENERATE, {"prompt": "x" * 3000})
    assert "max_message_bytes 2048" in err.value.message
    assert list(core.pending) == [small]  # nothing kept of the refused one


def test_a_continuation_that_grew_past_the_limit_ends_with_bad_request():
    core = ClientCore(clock=Clock())
    rid = started_stream(core, prompt="p" * 1500)
    probe, _ = core.probe()
    step = core.receive(frame(m.result(probe, {"pong": True, "version": "x", "instance": "bbbb",
                                               "session": NEW, "max_message_bytes": 1510})))
    assert step.send == []
    [(failed, error)] = step.replies
    assert failed == rid and isinstance(error, BadRequest)


def test_a_request_sent_again_counts_as_sent_after_the_pings_already_in_flight():
    """A ping's result judges only what was sent before that ping; a resend moves a request
    after every ping already sent, while an older request with no reply is still found."""
    core = ClientCore()
    pong(core, core.probe()[0], session=OLD)  # the session is known: no change below
    a, _ = core.request(Op.STATUS, {})
    p1, _ = core.request(Op.PING, {})
    d, _ = core.request(Op.STATUS, {})
    p2, _ = core.request(Op.PING, {})
    assert [r for r, _ in pong(core, p1, session=OLD).send] == [a]  # no reply before p1's
    assert [r for r, _ in pong(core, p2, session=OLD).send] == [d]  # a was sent again after p2


def test_a_request_held_for_room_to_send_is_not_lost_until_it_is_sent():
    core = ClientCore()
    pong(core, core.probe()[0], session=OLD)
    held, _ = core.request(Op.STATUS, {})
    core.hold(held)  # the socket had no room: it waits in the client
    ping, _ = core.probe()  # a probe can overtake it
    assert pong(core, ping, session=OLD).send == []
    core.sent(held)
    ping, _ = core.probe()
    assert [r for r, _ in pong(core, ping, session=OLD).send] == [held]  # sent, then no reply


def test_a_flood_of_pings_is_answered_in_linear_time():
    """Each ping's result looks only at what was sent before it and is still unanswered."""
    import time

    core = ClientCore()
    pong(core, core.probe()[0], session=OLD)
    rids = [core.request(Op.PING, {})[0] for _ in range(20_000)]
    started = time.perf_counter()
    for rid in rids:
        assert pong(core, rid, session=OLD).send == []
    assert time.perf_counter() - started < 5  # a scan of all pending per result took minutes
