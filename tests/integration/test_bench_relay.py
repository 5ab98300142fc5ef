"""The bench's bare relay, the ceiling stoker's capacity is compared with, must deliver every frame:
a ROUTER drops what a slow client's full pipe cannot take, which once lost ends (the bench then
waited for ever) and would have let the ceiling count tokens it never delivered."""

import multiprocessing
import time

import msgpack
import pytest
import zmq

from stoker.supervisor.bench import FAKE, _producer, _relay

pytestmark = pytest.mark.timeout(90)


def test_relay_delivers_every_frame_to_a_client_that_reads_late(short_dir):
    front, back = f"ipc://{short_dir}/front.sock", f"ipc://{short_dir}/back.sock"
    ctx = multiprocessing.get_context("spawn")
    relay = ctx.Process(target=_relay, args=(front, back), daemon=True)
    producer = ctx.Process(target=_producer, args=(back, 0), daemon=True)
    relay.start()
    producer.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(front)
    try:
        requests, tokens = 40, 200  # 8,040 frames: several times what default pipes hold
        for i in range(requests):
            sock.send(msgpack.packb({"v": 1, "op": "generate", "id": i, "model": FAKE, "prompt": f"r{i}",
                                     "max_tokens": tokens}))
        time.sleep(3)  # the producer answers everything while nothing is read
        got, ends = 0, set()
        while len(ends) < requests:
            assert sock.poll(20_000), f"frames lost: {len(ends)} of {requests} ends after {got} tokens"
            msg = msgpack.unpackb(sock.recv())
            if msg["ev"] == "token":
                got += msg["n"]
            else:
                ends.add(msg["id"])
        assert got == requests * tokens
    finally:
        sock.close()
        for proc in (producer, relay):
            proc.kill()
            proc.join(5)
