"""Fixtures that start real supervisors (real processes, real sockets) and always reap them."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest

from stoker.protocol.client import Client
from stoker.protocol.errors import Unreachable


def skip_or_fail_on_ci(reason: str) -> None:
    """Skip for a missing tool, except on CI (CI set): there what CI is meant to test must run,
    and a missing tool is a broken CI machine, not a reason to pass."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{reason} (CI is set: this test must run on CI)")
    pytest.skip(reason)


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> object:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def answers(endpoint: str, timeout: float = 0.5) -> bool:
    """Whether a supervisor at `endpoint` answers a ping."""
    try:
        with Client(endpoint) as c:
            c.ping(timeout=timeout)
        return True
    except Unreachable:
        return False


@dataclass
class RunningSupervisor:
    proc: subprocess.Popen
    endpoint: str
    folder: Path
    config_path: Path
    log_path: Path

    @property
    def socket_path(self) -> Path:
        return Path(self.endpoint[len("ipc://"):])

    def client(self, timeout: float = 60.0) -> Client:
        return Client(self.endpoint, timeout=timeout)

    def status(self) -> dict:
        with self.client() as c:
            return c.status()

    def workers(self, model: str | None = None, state: str | None = None) -> list[dict]:
        return [w for w in self.status()["workers"]
                if (model is None or w["model"] == model) and (state is None or w["state"] == state)]

    def worker_pids(self) -> set[int]:
        try:
            return {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def write_config(folder: Path, body: str, **supervisor: object) -> tuple[Path, str]:
    endpoint = f"ipc://{folder}/s.sock"
    sup = {"endpoint": endpoint, "state_dir": str(folder / "state"), **supervisor}
    lines = ["[supervisor]"] + [f"{k} = {_toml(v)}" for k, v in sup.items()] + ["", body]
    path = folder / "config.toml"
    path.write_text("\n".join(lines))
    return path, str(sup["endpoint"])


def _toml(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


FAKE_MODELS = """
[models.echo]
backend = "fake"
load_seconds = 0.2

[models.slow]
backend = "fake"
tokens_per_second = 20
load_seconds = 0.2

[models.endless]
backend = "fake"
tokens_per_second = 20
load_seconds = 0.2
end_every = 0
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short private folder: ipc socket paths must stay under ~100 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="stk-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def start_supervisor(short_dir: Path) -> Iterator[Callable[..., RunningSupervisor]]:
    """Start `stoker serve` with the given model tables; every one started is stopped and checked."""
    started: list[RunningSupervisor] = []

    def start(models: str = FAKE_MODELS, env: dict | None = None, nofile: int | None = None,
              **supervisor: object) -> RunningSupervisor:
        """`nofile`: run it under that RLIMIT_NOFILE (soft and hard, as `ulimit -n` sets).
        `_wait=False`: return at once (for endpoints `answers` cannot ping, like CurveZMQ ones)."""
        wait = supervisor.pop("_wait", True)
        supervisor.setdefault("default_model", "echo")
        supervisor.setdefault("stop_grace", 3)
        config_path, endpoint = write_config(short_dir, models, **supervisor)
        log_path = short_dir / "serve.log"

        def limits() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "stoker.supervisor", "serve", "--config", str(config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})}, preexec_fn=limits,
            )
        sup = RunningSupervisor(proc, endpoint, short_dir, config_path, log_path)
        started.append(sup)

        def up() -> bool:
            assert proc.poll() is None, f"supervisor exited early:\n{sup.log()}"
            return answers(endpoint)

        if wait:
            wait_for(up, 30, "the supervisor to answer")
        return sup

    yield start
    for sup in started:
        pids = sup.worker_pids()
        if sup.proc.poll() is None:
            sup.stop()
        for pid in pids:  # no worker outlives its supervisor
            wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                     10, f"worker {pid} to exit with its supervisor")
