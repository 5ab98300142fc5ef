"""The clients' side of the supervisor: one ROUTER socket that never drops a reply.

ROUTER_MANDATORY turns a full client pipe into an error instead of a silent drop; replies that
cannot go out yet wait in the client's Outbox (which merges a request's waiting tokens) and are
retried from the event loop.

Disconnects are seen as they happen: a socket monitor reports each closed connection by its file
descriptor, and every message read records which descriptor its client's connection uses.
"""

from __future__ import annotations

import fcntl
import os
import resource
import socket as pysocket
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import IO, TYPE_CHECKING

import zmq
from loguru import logger
from zmq.utils.monitor import parse_monitor_message

from stoker.protocol.codec import encode
from stoker.protocol.endpoint import full_socket_path, ipc_path, is_loopback, prepare_ipc_folder
from stoker.protocol.messages import Message
from stoker.supervisor.curve import CurveServer
from stoker.supervisor.fd_limits import (
    LISTEN_BACKLOG, ClientGate, ClientLimit, open_fds, raise_nofile_limit,
)
from stoker.supervisor.outbox import ClientId, Outbox
from stoker.supervisor.resources import trim_heap

if TYPE_CHECKING:
    from stoker.supervisor.config import SupervisorConfig

CLIENT_GONE_S = 5.0  # a client unreachable this long has disconnected; its requests are cancelled
_GONE_REMEMBERED = 10_000  # disconnected clients whose late messages are ignored


class AlreadyRunning(RuntimeError):
    """Another supervisor (or program) holds the endpoint."""


class Delivery(Enum):
    SENT = "sent"
    LATER = "later"  # the client's pipe is full (or briefly unreachable): keep it in the Outbox
    GONE = "gone"


@dataclass(frozen=True)
class OutboxLimit:
    """The most replies (bytes, and frames) that may wait for one client that does not read."""

    max_bytes: int = 16 * 1024 * 1024
    max_messages: int = 100_000


class Frontend:
    def __init__(self, ctx: zmq.Context, endpoint: str, max_message_bytes: int, socket_mode: int = 0o600,
                 outbox_limit: OutboxLimit = OutboxLimit(), curve: CurveServer | None = None,
                 max_clients: int = 0, worker_slots: int = 0) -> None:
        self.endpoint = endpoint
        self.outbox_limit = outbox_limit
        # Clients dropped for replies they left unread: what they send is ignored until they
        # disconnect (client -> the fd of their connection).
        self.dropped: dict[ClientId, int] = {}
        self.outboxes: dict[ClientId, Outbox] = {}
        self.unreachable_since: dict[ClientId, float] = {}
        self.last_full: dict[ClientId, float] = {}  # when a send last found the client's pipe full
        self.fd_client: dict[int, ClientId] = {}  # connection (file descriptor) -> its client
        # Disconnected clients (and the fd each used) whose messages still queued are dropped,
        # until that fd is accepted again or the client shows up on another one.
        self.gone: OrderedDict[ClientId, int] = OrderedDict()
        self.gone_fd: dict[int, ClientId] = {}
        self._newly_gone: list[ClientId] = []
        prepare_ipc_folder(endpoint)
        self._lock = self._lock_endpoint(endpoint)
        self.curve = curve
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.LINGER, 1000)
        # A hard memory bound behind the codec's: frames up to max_message_bytes are read, and
        # those a little over it get a clear error; libzmq disconnects a peer that sends more.
        self.socket.setsockopt(zmq.MAXMSGSIZE, 2 * max_message_bytes)
        self.socket.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)
        if curve is not None:
            curve.secure(self.socket)
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        path = ipc_path(endpoint)
        self.gate: ClientGate | None = None
        baseline = open_fds()
        try:
            if path is not None:
                # Our own listening socket, so that the gate can watch it (see fd_limits).
                self.socket.setsockopt(zmq.USE_FD, _listen_unix(path))
            self.socket.bind(endpoint)
        except (zmq.ZMQError, OSError) as exc:
            self.monitor.close()
            self.socket.close()
            if curve is not None:
                curve.stop()
            if getattr(exc, "errno", None) == zmq.EADDRINUSE:
                raise AlreadyRunning(f"{endpoint} is in use by another program") from None
            raise
        fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.client_limit = ClientLimit.derive(fd_limit, baseline, worker_slots, max_clients)
        if path is not None:
            # The folder is closed to others already; the socket is for this user only, or its group
            # too for a system service whose clients are in that group.
            os.chmod(path, socket_mode)
            _pidfile(path).write_text(f"{os.getpid()}\n")
            self.gate = ClientGate(path, self.socket.getsockopt(zmq.USE_FD), self.client_limit,
                                   lambda text: logger.warning("{}", text))

    @staticmethod
    def _lock_endpoint(endpoint: str) -> IO[str] | None:
        """Hold `<socket>.lock` for our lifetime. Binding an ipc path that exists replaces the
        other supervisor's socket file without an error, so the lock, not the file, decides."""
        path = ipc_path(endpoint)
        if path is None:
            return None  # tcp: bind itself fails with EADDRINUSE
        lock = open(f"{path}.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            pid = _read_pid(path)
            owner = f" (pid {pid})" if pid is not None else ""
            raise AlreadyRunning(f"a supervisor{owner} is already running at {endpoint}; "
                                 "stop it first (`stoker stop`) or pick another endpoint") from None
        # Files left by a supervisor that did not exit cleanly (kill -9, power loss).
        stale = [p for p in (path, _pidfile(path), full_socket_path(path)) if p.exists() or p.is_symlink()]
        if stale:
            pid = _read_pid(path)
            old = f"pid {pid}" if pid is not None else "a supervisor"
            logger.info("removing {} left by {}, which is no longer running", " and ".join(map(str, stale)), old)
            for p in stale:
                p.unlink(missing_ok=True)
        return lock

    def recv(self) -> list[bytes] | None:
        """The next message's frames (identity first), or None if nothing is waiting. Messages
        that disconnected clients sent before they left are dropped."""
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            client, fd = frames[0].bytes, frames[-1].get(zmq.SRCFD)
            if client in self.dropped:
                continue
            old_fd = self.gone.get(client)
            if old_fd is not None:
                if old_fd == fd:
                    continue
                self._unforget(client)  # a client with a fixed identity connected again
            if fd >= 0 and self.fd_client.get(fd) != client:
                # A new connection on this fd: the old one's close event is queued on the
                # monitor before anything the new one sent, so read it first.
                self._read_monitor()
                if client in self.gone:
                    continue
                self.fd_client[fd] = client
            return [f.bytes for f in frames]

    def disconnected(self) -> list[ClientId]:
        """Clients whose connection closed since the last call."""
        self._read_monitor()
        gone, self._newly_gone = self._newly_gone, []
        return gone

    def _read_monitor(self) -> None:
        # Runs every turn of the loop: asking first is cheaper than the exception an empty
        # socket raises.
        while self.monitor.get(zmq.EVENTS) & zmq.POLLIN:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            fd = int(event["value"])
            client = self.fd_client.pop(fd, None)
            if event["event"] == zmq.EVENT_DISCONNECTED:
                for dropped in [c for c, f in self.dropped.items() if f == fd]:
                    del self.dropped[dropped]
            if event["event"] == zmq.EVENT_DISCONNECTED and client is not None:
                self._newly_gone.append(client)
                self._unforget(self.gone_fd.get(fd))
                self.gone[client], self.gone_fd[fd] = fd, client
                if len(self.gone) > _GONE_REMEMBERED:
                    self._unforget(next(iter(self.gone)))
            elif event["event"] == zmq.EVENT_ACCEPTED:
                if self.gate is not None:
                    self.gate.nudge()
                # The fd belongs to a new connection now. Only a client that chose its own
                # routing id can come back under the same one; libzmq never reuses its own ids.
                old = self.gone_fd.get(fd)
                if old is not None and not old.startswith(b"\x00"):
                    self._unforget(old)

    def _unforget(self, client: ClientId | None) -> None:
        fd = self.gone.pop(client, None) if client is not None else None
        if fd is not None:
            self.gone_fd.pop(fd, None)

    def send(self, client: ClientId, msg: Message) -> Delivery:
        """Send a reply now, or keep it (in order) for later. GONE: the client is gone, or has
        left more replies unread than the outbox limit allows (then it is dropped: see drop)."""
        box = self.outboxes.get(client)
        if box is None:
            sent = self._try_send(client, encode(msg))
            if sent is not Delivery.LATER:
                return sent
            box = self.outboxes[client] = Outbox()
        box.add(msg)
        limit = self.outbox_limit
        if box.size > limit.max_bytes or len(box) > limit.max_messages:
            logger.warning("client {} left {} replies ({} bytes) unread, over the limit (max_outbox_bytes {}, "
                           "max_outbox_messages {}); dropping it", client.hex(), len(box), box.size,
                           limit.max_bytes, limit.max_messages)
            self.drop(client)
            return Delivery.GONE
        return Delivery.LATER

    def drop(self, client: ClientId) -> None:
        """Stop serving a client: its replies are thrown away, and what it sends is ignored
        until it disconnects."""
        fd = next((f for f, c in self.fd_client.items() if c == client), -1)
        self.dropped[client] = fd
        box = self.outboxes.pop(client, None)
        self.forget(client)
        if box is not None and box.size > 1024 * 1024:
            del box
            trim_heap()  # give the pages back to the system, not just to Python's allocator

    @property
    def pending(self) -> bool:
        return any(self.outboxes.values())

    def flush(self) -> list[ClientId]:
        """Retry what waits; returns the clients found gone (their replies are dropped)."""
        gone: list[ClientId] = []
        if not self.outboxes and not self.last_full:
            return gone
        for client, box in list(self.outboxes.items()):
            result = Delivery.SENT

            def deliver(frame: bytes) -> bool:
                nonlocal result
                result = self._try_send(client, frame)
                return result is Delivery.SENT

            if box.flush(deliver):
                del self.outboxes[client]
            elif result is Delivery.GONE:
                gone.append(client)
        now = time.monotonic()
        for client in [c for c, t in self.last_full.items() if now - t >= CLIENT_GONE_S]:
            del self.last_full[client]  # bounded by the clients that were full lately
        return gone

    def forget(self, client: ClientId) -> None:
        self.outboxes.pop(client, None)
        self.unreachable_since.pop(client, None)
        self.last_full.pop(client, None)

    def settled(self) -> None:
        """The daemon is ready to serve: the gate starts watching for clients (it counts those
        already connected, too)."""
        if self.gate is not None:
            self.gate.start()

    def _try_send(self, client: ClientId, frame: bytes) -> Delivery:
        try:
            self.socket.send_multipart([client, frame], zmq.NOBLOCK)
        except zmq.Again:
            self.unreachable_since.pop(client, None)
            self.last_full[client] = time.monotonic()
            return Delivery.LATER
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            # Either the client disconnected, or its pipe was full a moment ago: libzmq can report
            # EHOSTUNREACH for a live peer until it processes the reader's activate-write (libzmq
            # #2348). A client whose pipe has not been full lately is gone; one that was is gone
            # only once it stays unreachable.
            now = time.monotonic()
            if now - self.last_full.get(client, -CLIENT_GONE_S) >= CLIENT_GONE_S and client not in self.outboxes:
                return Delivery.GONE
            first = self.unreachable_since.setdefault(client, now)
            return Delivery.GONE if now - first >= CLIENT_GONE_S else Delivery.LATER
        self.unreachable_since.pop(client, None)
        return Delivery.SENT

    def close(self, linger_s: float = 1.0, retry_s: float = 0.005) -> None:
        """Give stalled clients a moment for their last replies, then close and remove the socket file."""
        deadline = time.monotonic() + linger_s
        while self.pending and time.monotonic() < deadline:
            self.flush()
            time.sleep(retry_s)
        if self.gate is not None:
            self.gate.stop()
        self.socket.disable_monitor()
        self.monitor.close()
        self.socket.close()
        if self.curve is not None:
            self.curve.stop()
        path = ipc_path(self.endpoint)
        if path is not None:
            path.unlink(missing_ok=True)
            full_socket_path(path).unlink(missing_ok=True)
            _pidfile(path).unlink(missing_ok=True)
        if self._lock is not None:
            self._lock.close()


def _listen_unix(path: Path) -> int:
    """A listening Unix socket at `path`, for libzmq to take over (ZMQ_USE_FD): its fd."""
    sock = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    try:
        path.unlink(missing_ok=True)  # a stale file (the lock is ours: no live supervisor uses it)
        sock.bind(os.fspath(path))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock.detach()  # libzmq closes it


def _pidfile(socket_path: "os.PathLike[str]") -> Path:
    return Path(f"{os.fspath(socket_path)}.pid")


def _read_pid(socket_path: "os.PathLike[str]") -> int | None:
    """The pid in the socket's pidfile, if there is a readable one."""
    try:
        return int(_pidfile(socket_path).read_text())
    except (OSError, ValueError):
        return None


def open_frontend(ctx: zmq.Context, sup: "SupervisorConfig", worker_slots: int) -> Frontend:
    """The frontend as the config asks for it, with the fd limit raised first and what it means
    for clients (and for security) logged."""
    before, after = raise_nofile_limit()
    curve = CurveServer(ctx, sup.curve_server_key, sup.curve_authorized_keys) if sup.curve_server_key else None
    frontend = Frontend(ctx, sup.endpoint, sup.max_message_bytes, sup.socket_mode,
                        OutboxLimit(sup.max_outbox_bytes, sup.max_outbox_messages), curve, sup.max_clients,
                        worker_slots)
    logger.info("file descriptors: limit {}{}; up to {} clients at once", after,
                f" (raised from {before})" if after != before else "", frontend.client_limit.max_clients)
    if after < 4096:
        logger.warning("the file-descriptor limit is only {}: set LimitNOFILE (systemd) or ulimit -n higher "
                       "to serve more clients", after)
    if curve is not None:
        logger.info("CurveZMQ: clients need a key in {}", sup.curve_authorized_keys)
    elif sup.endpoint.startswith("tcp://"):
        logger.warning("{} has no authentication: any user or program that can reach it can run models and "
                       "stop the supervisor{}", sup.endpoint,
                       "" if is_loopback(sup.endpoint) else " (allow_insecure_tcp is set)")
    if sup.endpoint.startswith("tcp://") and sup.max_clients:
        logger.warning("max_clients is enforced on ipc:// endpoints only")
    return frontend
