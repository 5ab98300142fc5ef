"""Where the supervisor listens, by default, and the filesystem side of ipc:// endpoints."""

from __future__ import annotations

import os
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


def ipc_path(endpoint: str) -> Path | None:
    """The socket file of an ipc:// endpoint, or None for other transports."""
    if endpoint.startswith(IPC_PREFIX):
        return Path(endpoint[len(IPC_PREFIX):])
    return None


def prepare_ipc_folder(endpoint: str) -> None:
    """Create the socket's folder with mode 0700 so other users cannot reach the supervisor."""
    path = ipc_path(endpoint)
    if path is not None and not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
