"""CurveZMQ keys: making key pairs, and finding the ones a client uses.

A supervisor on a tcp:// endpoint that others can reach encrypts and authenticates every
connection with CurveZMQ. Key files are ZeroMQ's certificate files, as `stoker keys` writes
them: `NAME.key` holds the public key (give it away), `NAME.key_secret` the pair (keep it,
mode 0600). A client needs the supervisor's public key and its own pair; the supervisor needs
its own pair and a folder of the public key files of the clients it lets in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import zmq
import zmq.auth

from stoker.protocol.errors import BadRequest

ENV_SERVER_KEY = "STOKER_SERVER_KEY"  # the supervisor's public key: a .key file, or the key itself (Z85)
ENV_CLIENT_KEY = "STOKER_CLIENT_KEY"  # this client's key pair: a .key_secret file
Z85_KEY_LENGTH = 40


class KeyError_(BadRequest):
    """A key file that is missing or does not hold what it should."""


@dataclass(frozen=True)
class ClientKeys:
    """What a client needs to reach a supervisor secured with CurveZMQ (all Z85, 40 characters)."""

    server_public: bytes
    public: bytes
    secret: bytes

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` a CurveZMQ client of the supervisor (before it connects)."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def create_key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (the pair, mode 0600) in `folder`; an existing
    pair is never overwritten."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise FileExistsError(f"{path} exists already; choose another name or folder")
    old = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        public_path, secret_path = zmq.auth.create_certificates(os.fspath(folder), name)
    finally:
        os.umask(old)
    os.chmod(public_path, 0o644)
    return Path(public_path), Path(secret_path)


def load_public(value: str | os.PathLike[str] | bytes) -> bytes:
    """A public key from a .key (or .key_secret) file, or given as its 40 Z85 characters."""
    if isinstance(value, bytes):
        text = value.decode("ascii", "replace")
    else:
        text = os.fspath(value)
    if len(text) == Z85_KEY_LENGTH and not Path(text).exists():
        return text.encode("ascii")
    public, _ = _load(Path(text))
    return public


def load_pair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) from a .key_secret file."""
    public, secret = _load(Path(path))
    if secret is None:
        raise KeyError_(f"{path} holds only a public key; give the .key_secret file that `stoker keys` wrote")
    return public, secret


def _load(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(os.fspath(path))
    except OSError as exc:
        raise KeyError_(f"cannot read the key file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise KeyError_(f"{path} is not a key file that `stoker keys` wrote ({exc})") from None
    if not public:
        raise KeyError_(f"{path} holds no public key; is it a key file that `stoker keys` wrote?")
    return public, secret


def client_keys(server_key: str | os.PathLike[str] | bytes | None, client_key: str | os.PathLike[str] | None,
                environ: Mapping[str, str]) -> ClientKeys | None:
    """The keys a client uses: given, or from STOKER_SERVER_KEY and STOKER_CLIENT_KEY; None if
    neither is set (a plain connection). One without the other is an error."""
    server_key = server_key or environ.get(ENV_SERVER_KEY) or None
    client_key = client_key or environ.get(ENV_CLIENT_KEY) or None
    if server_key is None and client_key is None:
        return None
    if server_key is None or client_key is None:
        raise KeyError_(f"CurveZMQ needs both the supervisor's public key ({ENV_SERVER_KEY}, --server-key) and "
                        f"this client's key pair ({ENV_CLIENT_KEY}, --client-key); `stoker keys` makes a pair")
    public, secret = load_pair(client_key)
    return ClientKeys(load_public(server_key), public, secret)
