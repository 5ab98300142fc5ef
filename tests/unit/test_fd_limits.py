"""connections(): the kernel's count of a Unix socket's connections, as the client gate reads it."""

from __future__ import annotations

import socket

from stoker.supervisor.fd_limits import connections


def test_queued_and_accepted_connections_count_and_any_socket_name_is_read(tmp_path):
    path = tmp_path / "s.sock"
    odd = socket.socket(socket.AF_UNIX)
    odd.bind(b"\0stoker-test-\xff\xfe")  # not UTF-8: the table is read as bytes
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()
    clients = [socket.socket(socket.AF_UNIX) for _ in range(2)]
    try:
        assert connections(path) == 0  # the listener itself is not a connection
        clients[0].connect(str(path))
        assert connections(path) == 1  # queued, not accepted yet
        accepted, _ = listener.accept()
        clients[1].connect(str(path))
        assert connections(path) == 2
        accepted.close()
        clients[0].close()
        assert connections(path) == 1
    finally:
        for s in (odd, listener, *clients):
            s.close()
