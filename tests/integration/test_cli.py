"""The typer CLI as a user runs it: auto-start, output, exit codes, stop."""

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from stoker.protocol.client import Client
from stoker.workers.fake_backend import complete

from ..conftest import FAKE_MODELS, answers, wait_for, write_config


@pytest.fixture
def cli(short_dir):
    config_path, endpoint = write_config(short_dir, FAKE_MODELS + '\n[models.glacial]\nbackend = "fake"\n'
                                         'tokens_per_second = 0.2\n', default_model="echo")
    env = {**os.environ, "XDG_STATE_HOME": str(short_dir / "xdg-state")}

    def run(*args, timeout=60):
        return subprocess.run([sys.executable, "-m", "stoker.supervisor", *args, "--config", str(config_path)],
                              capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)

    yield run
    if answers(endpoint):  # whatever a test left running is shut down, and gone before its folder is
        with Client(endpoint) as c:
            c.shutdown()
        wait_for(lambda: not answers(endpoint), 30, "the auto-started supervisor to exit")


def test_run_starts_a_supervisor_prints_tokens_and_the_rest_works(cli):
    assert cli("status").returncode == 2  # nothing running yet
    first = cli("run", "hello there", "--max-tokens", "12")
    assert first.returncode == 0, first.stderr
    assert first.stdout == "".join(complete("hello there", 0, 12)[0]) + "\n"
    assert "started a supervisor" in first.stderr
    second = cli("run", "again", "-n", "3", "--seed", "5")
    assert second.returncode == 0 and "started" not in second.stderr
    assert second.stdout == "".join(complete("again", 5, 3)[0]) + "\n"

    status = json.loads(cli("status", "--json").stdout)
    assert [(w["model"], w["served"]) for w in status["workers"]] == [("echo", 2)]
    table = cli("status").stdout
    assert "WORKER" in table and "echo" in table
    models = json.loads(cli("models", "--json").stdout)
    assert models["default"] == "echo"
    assert {m["name"] for m in models["models"]} >= {"echo", "slow", "glacial"}
    assert "BACKEND" in cli("models").stdout
    assert cli("load", "slow").returncode == 0
    assert {w["model"] for w in json.loads(cli("status", "--json").stdout)["workers"]} == {"echo", "slow"}
    unload = cli("unload", "slow")
    assert unload.returncode == 0 and "unloaded" in unload.stdout
    assert cli("load", "nope").returncode == 3

    stop = cli("stop")
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert cli("status").returncode == 2


def test_exit_codes(cli, short_dir):
    assert cli("run", "x", "--no-start").returncode == 2
    unknown = cli("run", "x", "-m", "nope")
    assert unknown.returncode == 3 and "stoker models" in unknown.stderr
    # A token every 5 s: silent for longer than --timeout, but the supervisor answers its pings,
    # so the run waits for its token instead of giving up.
    waited = cli("run", "x", "-m", "glacial", "-n", "1", "--timeout", "1")
    assert waited.returncode == 0 and waited.stdout.strip(), waited.stderr
    # A supervisor that stops answering (stopped) while the run waits cannot be reached: 2.
    pid = int((short_dir / "s.sock.pid").read_text())
    config = str(short_dir / "config.toml")
    stuck = subprocess.Popen([sys.executable, "-m", "stoker.supervisor", "run", "x", "-m", "glacial", "-n", "3",
                              "--timeout", "1", "--config", config], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    def busy() -> bool:
        with Client(f"ipc://{short_dir}/s.sock") as c:
            return any(w["model"] == "glacial" and w["state"] == "busy" for w in c.status()["workers"])

    wait_for(busy, 20, "the run to start")
    os.kill(pid, signal.SIGSTOP)
    try:
        code = stuck.wait(30)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert code == 2 and "did not answer" in stuck.communicate()[1]
    bad = cli("run", "x", "--max-tokens", "0")
    assert bad.returncode == 2 and "max-tokens" in bad.stderr.replace("'", "")  # typer's usage error


def test_a_bad_config_file_is_a_clear_error(short_dir):
    path = short_dir / "bad.toml"
    path.write_text("[supervisor]\nidle_timout = 3\n")
    out = subprocess.run([sys.executable, "-m", "stoker.supervisor", "serve", "--config", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "idle_timout" in out.stderr and "known:" in out.stderr


def test_after_kill_9_the_next_run_cleans_up_the_stale_socket_and_pidfile_and_starts(cli, short_dir):
    assert cli("run", "x", "-n", "2").returncode == 0  # auto-starts one
    sock = short_dir / "s.sock"
    pidfile = short_dir / "s.sock.pid"
    old = int(pidfile.read_text())
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE, 10,
             "the supervisor to die")
    assert sock.exists() and pidfile.exists()  # what kill -9 leaves behind
    again = cli("run", "after", "-n", "3")
    assert again.returncode == 0, again.stderr
    assert again.stdout == "".join(complete("after", 0, 3)[0]) + "\n"
    new = int(pidfile.read_text())
    assert new != old and psutil.pid_exists(new)
    log = (short_dir / "state" / "stoker.log").read_text()
    assert "which is no longer running" in log and f"left by pid {old}" in log
    # A second supervisor on the live endpoint refuses, naming the one that holds it.
    second = cli("serve", timeout=30)
    assert second.returncode == 2 and f"(pid {new}) is already running" in second.stderr
    assert cli("status").returncode == 0
