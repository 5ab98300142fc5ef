"""Bad input gets a clear error and changes nothing."""

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
