"""Small raw-socket helpers for integration tests that need more control than the Client gives."""

from __future__ import annotations

import msgpack
import zmq

from stoker.protocol.messages import is_terminal


def raw_socket(endpoint: str, rcvhwm: int | None = None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if rcvhwm is not None:
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        sock.setsockopt(zmq.RCVBUF, 4096)
    sock.connect(endpoint)
    return sock


def send(sock: zmq.Socket, **msg) -> None:
    sock.send(msgpack.packb({"v": 1, **msg}))


def recv(sock: zmq.Socket, timeout: float = 30.0) -> dict:
    assert sock.poll(int(timeout * 1000)), f"no reply within {timeout} s"
    return msgpack.unpackb(sock.recv())


def recv_until(sock: zmq.Socket, **wanted) -> dict:
    """Read replies until one has every key/value in `wanted` (e.g. ev="token"); returns it."""
    while True:
        msg = recv(sock)
        if all(msg.get(k) == v for k, v in wanted.items()):
            return msg


def collect(sock: zmq.Socket, ids: set, timeout: float = 60.0) -> dict:
    """Read replies until every id in `ids` has its terminal reply; returns id -> list of replies."""
    got: dict = {i: [] for i in ids}
    open_ids = set(ids)
    while open_ids:
        msg = recv(sock, timeout)
        got.setdefault(msg["id"], []).append(msg)
        if is_terminal(msg):
            open_ids.discard(msg["id"])
    return got


def text_of(replies: list) -> str:
    tokens = [r for r in replies if r["ev"] == "token"]
    seq = 0
    for t in tokens:  # the protocol's promise: no gaps, no repeats
        assert t["seq"] == seq, (t, seq)
        seq += t["n"]
    return "".join(t["text"] for t in tokens)
