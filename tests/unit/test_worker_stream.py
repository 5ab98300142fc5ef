"""The worker stream's framing over a real pipe: frames split anywhere, many in one read, ends."""

from __future__ import annotations

import os
import select
import threading

import msgpack
import pytest

from stoker.workers.stream import StreamReader, frame, write_all

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pipe():
    r, w = os.pipe()
    reader = StreamReader(r, max_frame_bytes=1 << 20)
    writer = os.fdopen(w, "wb", buffering=0)  # closed once, whether or not a test closed it
    yield reader, writer
    reader.close()
    writer.close()


def test_many_frames_in_one_read_come_out_in_order(pipe):
    reader, w = pipe
    msgs = [{"t": "token", "rid": 7, "text": f"tok{i}", "n": 1} for i in range(50)]
    w.write(b"".join(frame(m) for m in msgs))
    assert [msgpack.unpackb(f) for f in reader.read()] == msgs
    assert reader.read() == [] and not reader.eof and reader.partial == 0


def test_a_frame_split_anywhere_waits_for_its_rest(pipe):
    reader, w = pipe
    data = frame({"t": "end", "rid": 1, "reason": "stop"}) + frame({"t": "token", "rid": 2, "text": "x", "n": 1})
    got = []
    for i in range(len(data)):  # one byte at a time: header and body split at every point
        w.write(data[i:i + 1])
        got += reader.read()
    assert [msgpack.unpackb(f)["t"] for f in got] == ["end", "token"]
    assert reader.partial == 0


def test_a_frame_larger_than_the_pipe_buffer_arrives_whole(pipe):
    reader, w = pipe
    text = "y" * 300_000  # over a pipe's 64 KiB: the writer blocks until the reader reads
    data = frame({"t": "token", "rid": 3, "text": text, "n": 1})
    writer = threading.Thread(target=write_all, args=(w.fileno(), data))
    writer.start()
    got: list[bytes] = []
    while not got:
        assert select.select([reader.fd], [], [], 5)[0], "the writer stalled"
        got = reader.read()
    writer.join(5)
    assert msgpack.unpackb(got[0])["text"] == text


def test_the_writer_closing_is_the_end_and_a_partial_frame_is_left_over(pipe):
    reader, w = pipe
    data = frame({"t": "token", "rid": 1, "text": "a", "n": 1})
    w.write(data + data[:3])
    w.close()
    assert len(reader.read()) == 1
    assert reader.read() == []  # the end shows on the read after the data
    assert reader.eof and reader.partial == 3


def test_an_oversized_length_is_an_error_not_an_allocation(pipe):
    reader, w = pipe
    good = frame({"t": "end", "rid": 1, "reason": "stop"})
    w.write(good + (2**31).to_bytes(4, "little") + b"junk")
    # The frame before the junk still counts (an end just before it is no crash to resume).
    assert reader.read() == [good[4:]]
    assert "over the" in reader.error and reader.partial == 0
    w.write(good)
    assert reader.read() == []  # nothing more is read from a broken stream


def test_a_write_to_a_closed_reader_raises_broken_pipe():
    r, w = os.pipe()
    os.close(r)
    with pytest.raises(BrokenPipeError):
        write_all(w, frame({"t": "end"}))
    os.close(w)
