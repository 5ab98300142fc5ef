"""Thousands of random and mutated frames against a live supervisor: it answers every message
once, stays up, answers a ping afterwards, and its memory stays bounded."""

from __future__ import annotations

import msgpack
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stoker.protocol.messages import is_terminal

from .helpers import raw_socket, recv

KEYS = ["v", "op", "id", "model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k",
        "min_p", "repeat_penalty", "seed", "stop", "keep_alive", "target", "role", "content"]
# Every op but shutdown (which would end the test); generate and friends run on the fake model.
OPS = ["generate", "cancel", "status", "models", "load", "unload", "ping", "dance", ""]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40), st.binary(max_size=40),
    st.sampled_from([1, 0, -1, "echo", "slow", "user", "assistant", 2**32, 1e308]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=5),
), max_leaves=12)


@st.composite
def request_like(draw) -> dict:
    """Maps that look like requests: the right keys, mostly, with values of any type."""
    msg = {"v": draw(st.sampled_from([1, 1, 1, 2, "1", None])), "op": draw(st.sampled_from(OPS)),
           "id": draw(st.one_of(st.integers(0, 10**6), st.text(max_size=10), scalars))}
    if msg["op"] == "generate" and draw(st.booleans()):
        msg["prompt"] = draw(st.text(max_size=30))
        msg["max_tokens"] = draw(st.integers(1, 40))
    extra = draw(st.dictionaries(st.sampled_from(KEYS), values, max_size=4))
    return {**msg, **extra}


def mutate(frame: bytes, data) -> bytes:
    """Flip, drop or insert a few bytes of a valid frame."""
    b = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, max(0, len(b) - 1)))
        how = data.draw(st.sampled_from(["flip", "drop", "insert"]))
        if how == "flip" and b:
            b[where] ^= data.draw(st.integers(1, 255))
        elif how == "drop" and b:
            del b[where]
        else:
            b.insert(where, data.draw(st.integers(0, 255)))
    return bytes(b)


@st.composite
def messages(draw) -> list[bytes]:
    """One message: its frames (usually one)."""
    kind = draw(st.sampled_from(["bytes", "value", "request", "mutated", "mutated", "frames"]))
    if kind == "bytes":
        return [draw(st.binary(max_size=200))]
    if kind == "value":
        return [msgpack.packb(draw(values), use_bin_type=True)]
    request = msgpack.packb(draw(request_like()), use_bin_type=True)
    if kind == "request":
        return [request]
    if kind == "mutated":
        return [mutate(request, draw(st.data()))]
    return [request] + draw(st.lists(st.binary(max_size=20), min_size=1, max_size=3))


@pytest.mark.timeout(300)
def test_random_and_mutated_frames_get_one_reply_each_and_leave_the_supervisor_healthy(start_supervisor):
    sup = start_supervisor()
    proc = psutil.Process(sup.proc.pid)
    sock = raw_socket(sup.endpoint)
    counts = {"sent": 0, "terminal": 0}
    rss: list[int] = []

    @settings(max_examples=3000, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
    @given(messages())
    def one(frames: list[bytes]) -> None:
        sock.send_multipart(frames)
        counts["sent"] += 1
        # Every message, whatever it holds, gets exactly one terminal reply (a generate or load
        # that was valid gets its own after its work).
        while counts["terminal"] < counts["sent"]:
            counts["terminal"] += is_terminal(recv(sock, 30))
        if counts["sent"] in (500, 3000):
            rss.append(proc.memory_info().rss)

    one()
    assert not sock.poll(300), "a message got more than one terminal reply"
    sup_status = sup.status()
    assert sup_status["queues"] == {}
    sock.send(msgpack.packb({"v": 1, "op": "ping", "id": "after"}))
    assert recv(sock)["data"]["pong"] is True
    assert sup.proc.poll() is None
    assert "internal error" not in sup.log()  # every bad message was refused by validation, not by a bug
    # Bounded: after a warm-up, 2500 more messages do not grow the supervisor by more than 8 MiB.
    print("fuzz:", counts, "rss KiB", [r // 1024 for r in rss])
    assert rss[-1] - rss[0] < 8 * 1024 * 1024, [r // 1024 for r in rss]
    sock.close()
