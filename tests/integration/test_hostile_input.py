"""Bad input gets a clear error and changes nothing."""

import os
import stat

import msgpack
import pytest

from .helpers import raw_socket, recv


@pytest.fixture
def sup(start_supervisor):
    return start_supervisor()


def error_for(sup, frames) -> dict:
    sock = raw_socket(sup.endpoint)
    sock.send_multipart(frames)
    reply = recv(sock)
    sock.close()
    assert reply["ev"] == "error", reply
    return reply


@pytest.mark.parametrize("frames, fragment", [
    ([b"\xc1garbage"], "msgpack"),
    ([msgpack.packb([1, 2, 3])], "map"),
    ([msgpack.packb({1: 2})], "string"),
    ([b"", msgpack.packb({"v": 1, "op": "ping", "id": 1})], "one frame"),  # a REQ socket's delimiter
])
def test_malformed_frames_get_bad_request_with_null_id(sup, frames, fragment):
    reply = error_for(sup, frames)
    assert reply["id"] is None and reply["code"] == "bad_request" and fragment in reply["message"]


@pytest.mark.parametrize("msg, code, fragment", [
    ({"v": 2, "op": "ping", "id": 5}, "unsupported_version", "version"),
    ({"v": 1, "op": "dance", "id": 5}, "bad_request", "unknown op"),
    ({"v": 1, "op": "generate", "id": 5, "prompt": "x", "max_tokens": -3}, "bad_request", "max_tokens"),
    ({"v": 1, "op": "generate", "id": 5, "prompt": "x", "model": "nope"}, "unknown_model", "stoker models"),
    ({"v": 1, "op": "load", "id": 5, "model": "nope"}, "unknown_model", "nope"),
])
def test_invalid_requests_get_the_right_code_and_their_id(sup, msg, code, fragment):
    reply = error_for(sup, [msgpack.packb(msg)])
    assert (reply["id"], reply["code"]) == (5, code) and fragment in reply["message"]


def test_bad_input_changes_nothing(sup):
    for frames in ([b"\x00"], [msgpack.packb({"v": 1, "op": "generate", "id": 1, "prompt": "x", "model": "nope"})]):
        error_for(sup, frames)
    status = sup.status()
    assert status["workers"] == [] and status["queues"] == {}
    with sup.client() as c:
        assert c.ping()["pong"] is True


def _nested(depth: int) -> bytes:
    """A msgpack map whose `prompt` is `depth` arrays deep (built by hand: packb itself refuses)."""
    return b"\x83" + msgpack.packb("v") + b"\x01" + msgpack.packb("op") + msgpack.packb("ping") + \
        msgpack.packb("prompt") + b"\x91" * depth + b"\xc0"


_PING = b"\x83" + msgpack.packb("id") + b"\x01" + msgpack.packb("op") + msgpack.packb("ping") + msgpack.packb("v")


@pytest.mark.parametrize("frame, fragment", [
    (_nested(100_000), "msgpack"),  # a depth bomb: msgpack's own depth limit stops it
    (_PING + b"\xcf" + b"\xff" * 8, "version"),  # v = 2**64-1
    (_PING + b"\xd3" + b"\x80" + b"\x00" * 7, "version"),  # v = -2**63
    (b"\x81\xa2\xff\xfe\x01", "msgpack"),  # a key that is not UTF-8
    (b"\x83" + msgpack.packb("v") + b"\x01" + msgpack.packb("op") + b"\xa4\xc3\x28\xa0\xa1"
     + msgpack.packb("id") + b"\x01", "msgpack"),  # a value that is not UTF-8
    (b"\xdf\xff\xff\xff\xff", "msgpack"),  # a map claiming 4 billion entries
    (b"\xdb\x7f\xff\xff\xff", "msgpack"),  # a string claiming 2 GiB
])
def test_hostile_frames_get_a_clear_error(sup, frame, fragment):
    reply = error_for(sup, [frame])
    assert reply["code"] in ("bad_request", "unsupported_version") and fragment in reply["message"].lower()


@pytest.mark.parametrize("msg, fragment", [
    ({"v": 1, "op": "ping", "id": 1, "extra": True}, "extra"),
    ({"v": 1, "op": "generate", "id": 1}, "prompt"),
    ({"v": 1, "op": "generate", "id": 1, "prompt": 5}, "prompt"),
    ({"v": 1, "op": "generate", "id": 1, "prompt": "x", "messages": []}, "exactly one"),
    ({"v": 1, "op": "generate", "id": 1, "messages": [{"role": "user"}]}, "content"),
    ({"v": 1, "op": "generate", "id": 1, "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"v": 1, "op": "generate", "id": 1, "prompt": "x", "seed": 2**40}, "seed"),
    ({"v": 1, "op": "generate", "id": 1, "prompt": "x", "stop": ["a"] * 1000}, "stop"),
    ({"v": 1, "op": "cancel", "id": 1}, "target"),
    ({"v": 1, "op": "load", "id": 1, "model": ["x"]}, "model"),
])
def test_wrong_types_and_missing_or_extra_keys_get_bad_request_with_their_id(sup, msg, fragment):
    reply = error_for(sup, [msgpack.packb(msg)])
    assert reply["id"] == 1 and reply["code"] == "bad_request" and fragment in reply["message"]


def test_a_message_over_max_message_bytes_gets_an_error_and_a_huge_one_only_drops_its_sender(start_supervisor):
    sup = start_supervisor(max_message_bytes=64 * 1024)
    over = msgpack.packb({"v": 1, "op": "generate", "id": 1, "prompt": "x" * 100_000})
    reply = error_for(sup, [over])
    assert reply["code"] == "bad_request" and "max_message_bytes" in reply["message"]
    assert reply["id"] == 1  # read from the refused frame, so its sender knows which request it was
    # Past twice the limit libzmq itself (MAXMSGSIZE) drops the connection before reading it all.
    huge = raw_socket(sup.endpoint)
    huge.send(msgpack.packb({"v": 1, "op": "generate", "id": 2, "prompt": "x" * 1_000_000}))
    assert not huge.poll(1000)
    huge.close()
    with sup.client() as c:
        assert c.ping()["pong"] is True and sup.status()["queues"] == {}


def test_the_socket_is_for_this_user_only(sup):
    assert stat.S_IMODE(os.stat(sup.socket_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(sup.socket_path.parent).st_mode) == 0o700
