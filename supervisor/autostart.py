"""Start a supervisor in the background for the CLI when none answers, and wait until it does."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from stoker.protocol.client import Client
from stoker.protocol.errors import Unreachable


def start_detached(config_file: str | None, endpoint: str, state_dir: Path) -> tuple[subprocess.Popen, Path]:
    """`stoker serve` in its own session (it outlives this CLI). It logs to the state folder's
    stoker.log; its stdout and stderr (a crash before logging starts) go to supervisor.out."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = state_dir / "supervisor.out"
    cmd = [sys.executable, "-m", "stoker.supervisor", "serve", "--quiet", "--endpoint", endpoint]
    if config_file:
        cmd += ["--config", str(config_file)]
    # For this user only, as the log is: it can hold what a crashing start printed.
    with os.fdopen(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )
    return proc, log_path


def wait_ready(endpoint: str, proc: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    """Return once the supervisor answers a ping; raise Unreachable if it exits or never answers."""
    deadline = time.monotonic() + timeout
    with Client(endpoint) as client:
        while time.monotonic() < deadline:
            try:
                client.ping(timeout=0.5)
                return
            except Unreachable:
                pass
            if proc.poll() is not None:
                # Lost a race with another CLI that started one too? Then that one answers.
                try:
                    client.ping(timeout=2.0)
                    return
                except Unreachable:
                    tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                    raise Unreachable(
                        f"the supervisor exited with code {proc.returncode} during start-up; "
                        f"its log ({log_path}) ends: " + " | ".join(tail)
                    ) from None
            time.sleep(0.1)
    raise Unreachable(f"the supervisor did not answer at {endpoint} within {timeout:.0f} s; see {log_path}")
