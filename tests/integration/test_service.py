"""Running as a service: systemd units, install-service, `stoker config`, logs and metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from stoker.supervisor import service
from tests.conftest import skip_or_fail_on_ci, wait_for

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "stoker.supervisor"]


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, **kw)


# ---- systemd -------------------------------------------------------------------------------------

def test_the_repository_units_are_the_rendered_templates():
    python = "/opt/stoker/venv/bin/python"
    assert (REPO / "systemd" / "stoker.service").read_text() == service.render(True, python)
    assert (REPO / "systemd" / "stoker-system.service").read_text() == service.render(False, python)


@pytest.mark.parametrize("user", [True, False])
def test_systemd_analyze_verify_passes_on_both_units(tmp_path, user):
    if shutil.which("systemd-analyze") is None:
        skip_or_fail_on_ci("systemd-analyze is not installed")
    unit = tmp_path / "stoker.service"
    unit.write_text(service.render(user))  # ExecStart must exist: this installation's python
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    cmd = ["systemd-analyze", *(["--user"] if user else []), "verify", str(unit)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    # verify exits 0 even for unknown keys; it says so on stderr, which must stay empty.
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
    text = unit.read_text()
    for key in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "RestartSec=", "StartLimitBurst="):
        assert key in text
    if not user:
        for key in ("User=stoker", "ProtectSystem=strict", "ProtectHome=", "PrivateTmp=yes", "NoNewPrivileges=yes",
                    "RuntimeDirectory=stoker", "StateDirectory=stoker"):
            assert key in text


def test_install_service_writes_the_user_unit_for_this_installation(tmp_path):
    done = cli("install-service", "--user", "--no-start", env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    unit = tmp_path / "systemd" / "user" / "stoker.service"
    assert unit.read_text() == service.render(True)
    assert f"ExecStart={sys.executable} -m stoker.supervisor serve" in unit.read_text()
    assert "systemctl --user daemon-reload && systemctl --user enable --now stoker" in done.stdout
    printed = cli("install-service", "--system", "--print")
    assert printed.returncode == 0 and printed.stdout == service.render(False)


# ---- configuration ------------------------------------------------------------------------------

def test_stoker_config_prints_each_value_and_where_it_came_from(short_dir):
    cfg = short_dir / "c.toml"
    cfg.write_text('[supervisor]\nidle_timeout = 42\nram_budget = "2GiB"\n[models.f]\nbackend = "fake"\n')
    done = cli("config", "--config", str(cfg), "--endpoint", f"ipc://{short_dir}/x.sock",
               env={"STOKER_MAX_QUEUE": "77"})
    assert done.returncode == 0, done.stderr
    lines = {ln.split(" =")[0]: ln for ln in done.stdout.splitlines() if " = " in ln}
    assert lines["idle_timeout"].endswith(f"# {cfg}") and "42" in lines["idle_timeout"]
    assert lines["ram_budget"].startswith(f"ram_budget = {2 * 1024**3}")
    assert lines["max_queue"].endswith("# env STOKER_MAX_QUEUE") and "77" in lines["max_queue"]
    assert lines["endpoint"].endswith("# flag")
    assert lines["drain_timeout"].endswith("# default")
    assert "[models.f]" in done.stdout
    data = json.loads(cli("config", "--json", "--config", str(cfg)).stdout)
    assert data["supervisor"]["idle_timeout"] == 42 and data["sources"]["models.f"] == str(cfg)


@pytest.mark.parametrize("toml, env, words", [
    ('[supervisor]\nidle_timout = 5\n', {}, ["c.toml", "idle_timout"]),
    ('[supervisor]\nmax_queue = "lots"\n', {}, ["c.toml", "max_queue"]),
    ('[models.m]\nbackend = "llama"\n', {}, ["c.toml", "models.m", "path"]),
    ('', {"STOKER_RAM_BUDGET": "8 bananas"}, ["STOKER_RAM_BUDGET", "ram_budget"]),
    ('[supervisor]\nmetrics = "nowhere"\n', {}, ["metrics", "HOST:PORT"]),
])
def test_a_misconfiguration_is_one_line_naming_the_key_and_where(short_dir, toml, env, words):
    cfg = short_dir / "c.toml"
    cfg.write_text(toml)
    done = cli("serve", "--config", str(cfg), env=env)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("stoker: configuration error:")
    for word in words:
        assert word in lines[0], lines[0]


# ---- logs and metrics ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_request_log_lines_the_log_file_and_metrics(start_supervisor, short_dir):
    port = free_port()
    sup = start_supervisor(metrics=f"127.0.0.1:{port}", env={"JOURNAL_STREAM": "8:1234"})
    before = scrape(port)
    assert before.get('stoker_requests_total{model="echo",outcome="length"}', 0) == 0
    with sup.client() as c:
        c.complete("one", model="echo", max_tokens=3, seed=1)
        c.complete("two", model="echo", max_tokens=3, seed=2)
        with pytest.raises(Exception):
            c.complete("x", model="echo", max_tokens=0)  # refused before it is a request: not counted
    log_file = short_dir / "state" / "stoker.log"
    wait_for(lambda: log_file.exists() and log_file.read_text().count("request ") >= 2, 10, "request lines")
    lines = [ln for ln in log_file.read_text().splitlines() if "request " in ln and "on 'echo'" in ln]
    assert re.search(r"request 1 of client [0-9a-f]+ on 'echo': (length|stop), \d+ tokens; queued [\d.]+ ms, "
                     r"load [\d.]+ ms, ttft [\d.]+ ms, total [\d.]+ ms", lines[0]), lines[0]
    # Under systemd (JOURNAL_STREAM set), stderr lines carry no timestamp of their own.
    stderr_lines = [ln for ln in sup.log().splitlines() if "listening on" in ln]
    assert stderr_lines and not re.match(r"\d{4}-\d\d-\d\d", stderr_lines[0]), stderr_lines

    def moved() -> dict | None:
        after = scrape(port)
        done = sum(v for k, v in after.items() if k.startswith('stoker_requests_total{model="echo"'))
        return after if done >= 2 and after.get('stoker_workers{state="idle"}') == 1 else None

    after = wait_for(moved, 10, "the counters to move")
    assert after['stoker_worker_starts_total{model="echo"}'] == 1
    assert after['stoker_model_loads_total{model="echo"}'] == 1
    assert after['stoker_tokens_generated_total{model="echo"}'] >= 2
    assert after['stoker_load_seconds_count{model="echo"}'] == 1
    assert after['stoker_time_to_first_token_seconds_count{model="echo"}'] == 2
    assert after['stoker_queue_depth{model="echo"}'] == 0
    assert after['stoker_memory_bytes{kind="ram",what="used"}'] > 0

    logs = cli("logs", "-n", "3", "--config", str(sup.config_path))
    assert logs.returncode == 0 and len(logs.stdout.splitlines()) == 3
    [w] = sup.workers("echo")
    worker_logs = cli("logs", "--worker", "echo", "--config", str(sup.config_path))
    assert worker_logs.returncode == 0 and f"(pid {w['pid']})" in worker_logs.stdout
