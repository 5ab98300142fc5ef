"""The stoker of one Ray node, for a self-contained run: an actor pinned to the node that uses the
supervisor already serving there (a system service at the default endpoint), or starts `stoker
serve` as a child process and restarts it if it dies.

The child is started from a thread that lives as long as the actor, never by forking in the Ray
worker's own threads: PR_SET_PDEATHSIG fires when the *thread* that started the child exits, and
it is what takes the child down with the actor (a node removed, a job ended).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from stoker.protocol.client import Client
from stoker.protocol.endpoint import endpoint_from_env

_RESTART_S = (0.5, 10.0)


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def answers(endpoint: str, timeout: float = 1.0) -> bool:
    try:
        with Client(endpoint, timeout=timeout) as c:
            c.ping(timeout=timeout)
        return True
    except Exception:
        return False


class StokerNode:
    """A Ray actor (see driver.py, which pins one to each node with the `stoker` resource)."""

    def __init__(self, models_toml: str, default_model: str, use_service: bool = True) -> None:
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()
        service = endpoint_from_env(os.environ)
        self.own = not (use_service and answers(service))
        self.proc: subprocess.Popen | None = None
        self.stopping = False
        self.restarts = 0
        if not self.own:
            self.endpoint = service
            return
        self.folder = Path(tempfile.mkdtemp(prefix="stk-ray-", dir="/tmp"))
        self.endpoint = f"ipc://{self.folder}/s.sock"
        (self.folder / "config.toml").write_text(
            f'[supervisor]\nendpoint = "{self.endpoint}"\nstate_dir = "{self.folder / "state"}"\n'
            f'default_model = "{default_model}"\nmax_queue = 100000\n\n{models_toml}\n')
        started = threading.Event()
        self.thread = threading.Thread(target=self._keep_running, args=(started,), name="stoker-serve", daemon=True)
        self.thread.start()
        started.wait(30)
        deadline = time.monotonic() + 60
        while not answers(self.endpoint, 0.5):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the stoker on node {self.node_id[:8]} did not start; see {self.folder}/serve.log")
            time.sleep(0.1)

    def _keep_running(self, started: threading.Event) -> None:
        delay = _RESTART_S[0]
        while not self.stopping:
            with (self.folder / "serve.log").open("ab") as log:
                # The node's own STOKER_* settings (a service's endpoint, say) would override the
                # configuration written for this stoker: left out.
                env = {k: v for k, v in os.environ.items() if not k.startswith("STOKER_")}
                self.proc = subprocess.Popen([sys.executable, "-m", "stoker.supervisor", "serve", "--config",
                                              str(self.folder / "config.toml")], stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, env=env)
            started.set()
            began = time.monotonic()
            self.proc.wait()
            if self.stopping:
                return
            self.restarts += 1
            delay = _RESTART_S[0] if time.monotonic() - began > 60 else min(delay * 2, _RESTART_S[1])
            time.sleep(delay)

    def info(self) -> dict:
        """Where its stoker listens, on which node, and the models it has."""
        with Client(self.endpoint, timeout=30) as c:
            models = [m["name"] for m in c.models()["models"]]
        return {"node_id": self.node_id, "endpoint": self.endpoint, "models": models, "own": self.own,
                "restarts": self.restarts, "pid": self.proc.pid if self.proc else None}

    def stop(self) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.own and self.restarts == 0:  # its folder (config, log, state) is kept only after trouble
            shutil.rmtree(self.folder, ignore_errors=True)
