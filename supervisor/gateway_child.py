"""The HTTP gateway as a child of `stoker serve` (its configuration's [gateway] listen): started
after the supervisor binds, restarted when it dies (backing off from 1 s to 30 s while it keeps
dying within a minute of its start), stopped with the supervisor (and, should the supervisor be
killed outright, it stops by itself: it watches for its parent to go). Its output goes to its own log,
gateway.log in the state folder. The gateway is a client like any other: it holds no model, and
nothing the supervisor does waits for it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from loguru import logger

from stoker.supervisor.config import Config

_BACKOFF_S = (1.0, 30.0)
_STABLE_S = 60.0  # up this long: its next death starts the backoff again
_STOP_S = 5.0


class GatewayChild:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(config.supervisor.state_dir) / "gateway.log"
        self.started_at = 0.0
        self.restart_at: float | None = None
        self.delay = _BACKOFF_S[0]

    @property
    def wanted(self) -> bool:
        return bool(self.config.gateway.listen)

    def start(self, now: float) -> None:
        if not self.wanted:
            return
        import importlib.util

        if importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("starlette") is None:
            logger.error("[gateway] listen = {!r} is set, but the http extra is not installed (pip install "
                         "'stoker[http]'); no gateway", self.config.gateway.listen)
            self.config = _without_gateway(self.config)
            return
        gw = self.config.gateway
        cmd = [sys.executable, "-m", "stoker.gateway", "--listen", gw.listen, "--endpoint",
               self.config.supervisor.endpoint, "--parent", str(os.getpid())]
        if self.config.source:
            cmd += ["--config", self.config.source]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True)  # a Ctrl-C is the supervisor's to pass on
        except OSError as exc:
            logger.error("could not start the gateway: {}", exc)
            self._retry(now)
            return
        self.started_at, self.restart_at = now, None
        logger.info("gateway (pid {}) on http://{}, log {}", self.proc.pid, gw.listen, self.log_path)

    def tick(self, now: float, stopping: bool) -> None:
        """Restart it if it died (not while the supervisor stops)."""
        if stopping or not self.wanted:
            return
        if self.proc is not None and self.proc.poll() is not None:
            code, self.proc = self.proc.returncode, None
            logger.warning("the gateway exited (code {}); restarting it; see {}", code, self.log_path)
            if now - self.started_at >= _STABLE_S:
                self.delay = _BACKOFF_S[0]
            self._retry(now)
        if self.proc is None and self.restart_at is not None and now >= self.restart_at:
            self.start(now)

    def next_deadline(self) -> float | None:
        if not self.wanted:
            return None
        return self.restart_at if self.restart_at is not None else time.monotonic() + 1.0  # look at it each second

    def _retry(self, now: float) -> None:
        self.restart_at = now + self.delay
        self.delay = min(self.delay * 2, _BACKOFF_S[1])

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        self.restart_at = None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(_STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _without_gateway(config: Config) -> Config:
    from dataclasses import replace

    from stoker.supervisor.config import GatewayConfig

    return replace(config, gateway=GatewayConfig())
