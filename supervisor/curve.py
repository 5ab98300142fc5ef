"""The supervisor's side of CurveZMQ: its key pair, and who may connect.

libzmq asks a ZAP handler about every new connection (pyzmq's ThreadAuthenticator answers on a
thread of its own). A client is let in when its public key is in the authorized folder, as a
key file; the folder is read again whenever it changes, so adding or removing a client's key
takes effect for its next connection without a restart. A connection without CurveZMQ, or with
another server key, fails its handshake and gets nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import zmq
import zmq.auth
from loguru import logger
from zmq.auth.thread import ThreadAuthenticator

from stoker.protocol.curve_keys import load_pair

_DENIED_LOG_EVERY_S = 10.0  # one log line per unknown key per this long, however often it tries


class AuthorizedKeys:
    """The public keys in a folder of key files, read again when the folder changes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._keys: set[bytes] = set()
        self._seen: object = None
        self._denied: dict[bytes, float] = {}

    def _refresh(self) -> None:
        try:
            # Each key file's name, inode, size and time: a file replaced or rewritten in place
            # changes the folder's own time only sometimes.
            st = self.folder.stat()
            files = []
            for path in sorted(self.folder.glob("*.key")):
                try:
                    f = path.stat()
                except OSError:
                    continue
                files.append((path.name, f.st_ino, f.st_size, f.st_mtime_ns))
            seen = (st.st_mtime_ns, st.st_ino, tuple(files))
        except OSError as exc:
            logger.warning("cannot read the authorized keys in {}: {}; no client is let in", self.folder, exc)
            self._keys, self._seen = set(), None
            return
        if seen == self._seen:
            return
        keys: set[bytes] = set()
        for path in sorted(self.folder.glob("*.key")):
            try:
                public, _ = zmq.auth.load_certificate(os.fspath(path))
            except (OSError, ValueError) as exc:
                logger.warning("ignoring {} in the authorized keys: {}", path.name, exc)
                continue
            if public:
                keys.add(public)
        self._keys, self._seen = keys, seen
        logger.info("{} authorized client key(s) in {}", len(keys), self.folder)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: whether a client with this public key (Z85) may connect."""
        self._refresh()
        if key in self._keys:
            return True
        now = time.monotonic()
        if now - self._denied.get(key, -_DENIED_LOG_EVERY_S) >= _DENIED_LOG_EVERY_S:
            if len(self._denied) > 1000:
                self._denied.clear()
            self._denied[key] = now
            logger.warning("refused a client whose key {}... is not in {}", key[:8].decode("ascii", "replace"),
                           self.folder)
        return False


class CurveServer:
    """This supervisor's key pair, and the ZAP handler that decides who connects."""

    def __init__(self, ctx: zmq.Context, server_key_file: str, authorized_folder: str) -> None:
        self.public, self.secret = load_pair(server_key_file)
        self.keys = AuthorizedKeys(Path(authorized_folder))
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.auth.configure_curve_callback(domain="*", credentials_provider=self.keys)

    def secure(self, sock: zmq.Socket) -> None:
        """Make `sock` a CurveZMQ server (before it binds)."""
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret

    def stop(self) -> None:
        self.auth.stop()
