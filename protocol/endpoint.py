"""Where the supervisor listens, by default, and the filesystem side of ipc:// endpoints."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path
from typing import Mapping

IPC_PREFIX = "ipc://"


def default_endpoint(environ: Mapping[str, str]) -> str:
    """The protocol's default: ipc://$XDG_RUNTIME_DIR/stoker/stoker.sock, else /tmp/stoker-$UID/."""
    runtime = environ.get("XDG_RUNTIME_DIR")
    folder = Path(runtime) / "stoker" if runtime else Path(f"/tmp/stoker-{os.getuid()}")
    return f"{IPC_PREFIX}{folder / 'stoker.sock'}"


def endpoint_from_env(environ: Mapping[str, str]) -> str:
    """STOKER_ENDPOINT if set, else the default (for clients with no configuration of their own)."""
    return environ.get("STOKER_ENDPOINT") or default_endpoint(environ)


def is_loopback(endpoint: str) -> bool:
    """Whether a tcp:// endpoint is reachable from this machine only (127.0.0.0/8, ::1, localhost).
    A wildcard, an interface name or any other host name is not."""
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rpartition(":")[0]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ipc_path(endpoint: str) -> Path | None:
    """The socket file of an ipc:// endpoint, or None for other transports."""
    if endpoint.startswith(IPC_PREFIX):
        return Path(endpoint[len(IPC_PREFIX):])
    return None


def full_socket_path(socket_path: Path) -> Path:
    """Where a supervisor that takes no more clients keeps its socket file meanwhile (new clients
    find no socket; see the protocol README, section 1)."""
    return Path(f"{os.fspath(socket_path)}.full")


def prepare_ipc_folder(endpoint: str) -> None:
    """Create the socket's folder with mode 0700 so other users cannot reach the supervisor.

    A folder that already exists must be ours and closed to others: in a shared /tmp, another
    user could create /tmp/stoker-<uid> first and swap the socket file for their own.
    Raises PermissionError saying what is wrong.
    """
    path = ipc_path(endpoint)
    if path is None:
        return
    folder = path.parent
    folder.mkdir(parents=True, mode=0o700, exist_ok=True)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"{folder} (the socket's folder) is not a directory")
    if info.st_uid != os.getuid():
        raise PermissionError(f"{folder} (the socket's folder) belongs to uid {info.st_uid}, not to you")
    if info.st_mode & 0o022:
        raise PermissionError(
            f"{folder} (the socket's folder) can be written by others (mode {stat.S_IMODE(info.st_mode):o}); "
            "put the socket in a folder of its own, e.g. the default "
            f"{default_endpoint({})}"
        )
