"""Starting `stoker gateway` beside a test's supervisor, on a free loopback port."""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest

from tests.conftest import wait_for

pytest.importorskip("starlette", reason="the http extra (starlette, uvicorn) is not installed")


@dataclass
class RunningGateway:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def healthy(url: str) -> bool:
    """Whether a gateway at `url` answers /health with 200 (its supervisor answers too)."""
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def start_gateway() -> Iterator[Callable[..., RunningGateway]]:
    started: list[RunningGateway] = []

    def start(sup, *extra: str) -> RunningGateway:
        port = free_port()
        log_path = sup.folder / f"gateway-{port}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "stoker.gateway", "--listen", f"127.0.0.1:{port}",
                                     "--config", str(sup.config_path), *extra],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        gw = RunningGateway(proc, f"http://127.0.0.1:{port}", log_path)
        started.append(gw)

        def up() -> bool:
            assert proc.poll() is None, f"gateway exited early:\n{gw.log()}"
            try:
                return httpx.get(gw.url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 30, "the gateway to answer")
        return gw

    yield start
    for gw in started:
        if gw.proc.poll() is None:
            gw.proc.terminate()
            try:
                gw.proc.wait(10)
            except subprocess.TimeoutExpired:
                gw.proc.kill()
