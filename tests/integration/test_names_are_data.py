"""Names that come from files or clients are data: they never forge a log line, never reach a
terminal as escape sequences, and `stoker config` stays TOML that parses."""

from __future__ import annotations

import re
import stat
import subprocess
import sys

import pytest

from stoker.protocol.client import Client
from stoker.protocol.errors import LoadFailed
from tests.conftest import FAKE_MODELS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EVIL = 'evil\n2026-01-01 00:00:00.000 INFO    forged line\x1b[31m "quoted" [models.x] \\ \x7f'
CLI = [sys.executable, "-m", "stoker.supervisor"]
LINE_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} [A-Z]+ ")


def test_a_model_file_name_with_newlines_and_escapes_forges_nothing(start_supervisor, short_dir):
    models = short_dir / "models"
    models.mkdir()
    (models / f"{EVIL}.gguf").write_bytes(b"not a gguf")
    sup = start_supervisor(FAKE_MODELS, models_dir=str(models), crash_loop_max=0)
    with Client(sup.endpoint, timeout=30) as c:
        names = {r["name"] for r in c.models()["models"]}
        assert EVIL in names
        with pytest.raises(LoadFailed):
            c.complete("x", model=EVIL, max_tokens=2)
        c.complete("y", model="echo", max_tokens=2)
    log_path = short_dir / "state" / "stoker.log"
    log = log_path.read_text()
    assert "\x1b" not in log and "\x7f" not in log
    assert all(LINE_START.match(line) for line in log.splitlines()), log
    assert "forged line" in log  # still there, as data, inside its real line
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    args = ["--config", str(sup.config_path)]
    shown = subprocess.run(CLI + ["logs", "-n", "200"] + args, capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and "\x1b" not in shown.stdout and "forged line" in shown.stdout
    worker_log = subprocess.run(CLI + ["logs", "--worker", EVIL] + args, capture_output=True, text=True, timeout=30)
    assert "\x1b" not in worker_log.stdout
    listed = subprocess.run(CLI + ["models"] + args, capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0 and "\x1b" not in listed.stdout
    assert len(listed.stdout.strip().splitlines()) == 1 + len(names)  # a header and one row per model

    config = subprocess.run(CLI + ["config"] + args, capture_output=True, text=True, timeout=30)
    assert config.returncode == 0, config.stderr
    parsed = tomllib.loads(config.stdout)  # raises if it is not TOML
    assert EVIL in parsed["models"] and parsed["models"][EVIL]["path"].endswith(f"{EVIL}.gguf")
    assert parsed["supervisor"]["models_dir"] == str(models)
