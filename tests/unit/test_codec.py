import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stoker.protocol.codec import MAX_FRAME_BYTES, decode, encode
from stoker.protocol.errors import BadRequest


def test_roundtrip():
    msg = {"v": 1, "id": "a", "ev": "token", "seq": 0, "n": 2, "text": "héllo"}
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize("obj", [[1, 2], "text", 3, None, b"bytes"])
def test_non_map_is_bad_request(obj):
    with pytest.raises(BadRequest, match="map"):
        decode(msgpack.packb(obj))


def test_non_string_keys_rejected():
    with pytest.raises(BadRequest, match="string"):
        decode(msgpack.packb({1: "x"}))


def test_garbage_rejected():
    with pytest.raises(BadRequest, match="msgpack"):
        decode(b"\xc1\xff\x00")


def test_oversize_frame_rejected_before_parsing():
    with pytest.raises(BadRequest, match="limit"):
        decode(b"\x80" + b" " * MAX_FRAME_BYTES)


def test_trailing_bytes_rejected():
    with pytest.raises(BadRequest):
        decode(encode({"a": 1}) + b"\x01")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_only_ever_raise_bad_request(data):
    try:
        assert isinstance(decode(data), dict)
    except BadRequest:
        pass
