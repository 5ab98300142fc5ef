"""The Frontend's view of client connections, on a real ROUTER socket."""

import time

import msgpack
import zmq

from stoker.supervisor.frontend import Frontend

from ..conftest import wait_for


def test_a_new_client_on_a_reused_fd_is_never_taken_for_the_one_that_left(short_dir):
    ctx = zmq.Context()
    front = Frontend(ctx, f"ipc://{short_dir}/f.sock", 1 << 20)
    try:
        a = ctx.socket(zmq.DEALER)
        a.connect(front.endpoint)
        a.send(msgpack.packb({"from": "a"}))
        first = wait_for(front.recv, 5, 'a message')
        a.close(linger=0)
        time.sleep(0.2)  # A's close and B's connect both wait on the monitor, unread
        b = ctx.socket(zmq.DEALER)
        b.connect(front.endpoint)
        b.send(msgpack.packb({"from": "b"}))
        second = wait_for(front.recv, 5, 'a message')  # read before anyone asked for disconnects
        assert msgpack.unpackb(second[1]) == {"from": "b"}
        assert front.disconnected() == [first[0]]  # A, not B
        b.close(linger=0)
        assert wait_for(front.disconnected, 5, 'the close') == [second[0]]
    finally:
        front.close(linger_s=0)
        ctx.term()
