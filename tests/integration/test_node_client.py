"""The protocol is language-neutral: the Node.js example client against a live supervisor.

Skipped when node (or npm, to install its two packages) is missing or the registry unreachable;
on CI (CI set) that fails instead.
The packages are installed once into a cache folder, outside the source tree.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from stoker.workers.fake_backend import complete as fake_complete

from ..conftest import skip_or_fail_on_ci

EXAMPLE = Path(__file__).resolve().parents[2] / "protocol" / "examples" / "node"
MODEL = '[models.f]\nbackend = "fake"\ntokens_per_second = 500\nend_every = 0\n'


@pytest.fixture(scope="module")
def node_client() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        skip_or_fail_on_ci("node and npm are not installed")
    package = (EXAMPLE / "package.json").read_bytes()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = base / "stoker-tests" / f"node-client-{hashlib.sha256(package).hexdigest()[:12]}"
    if not (folder / "node_modules" / "zeromq").is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(EXAMPLE / "package.json", folder / "package.json")
        try:
            npm = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=folder,
                                 capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            skip_or_fail_on_ci("npm install timed out (no registry?)")
        if npm.returncode != 0:
            skip_or_fail_on_ci(f"npm install failed (no registry?): {npm.stderr.strip()[-300:]}")
    shutil.copy(EXAMPLE / "client.mjs", folder / "client.mjs")
    return folder / "client.mjs"


def node(client: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["node", str(client), *args], capture_output=True, text=True, timeout=60)


def test_the_node_client_streams_the_same_text_as_the_python_one(start_supervisor, node_client):
    sup = start_supervisor(MODEL)
    out = node(node_client, "--endpoint", sup.endpoint, "--model", "f", "--max-tokens", "12", "--seed", "3",
               "hello from node")
    assert out.returncode == 0, out.stderr
    with sup.client() as c:
        expected = c.complete("hello from node", model="f", max_tokens=12, seed=3).text
    assert expected == "".join(fake_complete("hello from node", 3, 12, 0)[0])
    assert out.stdout == expected + "\n"
    summary = json.loads(out.stderr.strip().splitlines()[-1])
    assert summary["reason"] == "length" and summary["tokens"] == 12 == summary["usage"]["completion_tokens"]
    assert set(summary["timings"]) >= {"queued_ms", "load_ms", "ttft_ms", "total_ms"}

    chat = node(node_client, "--endpoint", sup.endpoint, "--model", "f", "--max-tokens", "4", "--chat", "hi")
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr

    schema = {"type": "object", "properties": {"city": {"type": "string"}, "pop": {"type": "integer"}},
              "required": ["city", "pop"]}
    schema_file = sup.config_path.parent / "schema.json"
    schema_file.write_text(json.dumps(schema))
    shaped = node(node_client, "--endpoint", sup.endpoint, "--model", "f", "--max-tokens", "200", "--schema",
                  str(schema_file), "a city")
    assert shaped.returncode == 0, shaped.stderr
    value = json.loads(shaped.stderr.strip().splitlines()[-1])["json"]
    assert set(value) == {"city", "pop"} and isinstance(value["pop"], int)
    assert value == json.loads(shaped.stdout)

    unknown = node(node_client, "--endpoint", sup.endpoint, "--model", "nope", "x")
    assert unknown.returncode == 3 and json.loads(unknown.stderr)["code"] == "unknown_model"


def test_the_node_client_without_a_supervisor_exits_2(node_client, short_dir):
    out = node(node_client, "--endpoint", f"ipc://{short_dir}/none.sock", "x")
    assert out.returncode == 2 and "no supervisor" in out.stderr


def test_the_node_client_takes_curve_keys_by_option_and_environment(start_supervisor, node_client, short_dir):
    import socket
    import sys

    folder, authorized = short_dir / "keys", short_dir / "authorized"
    authorized.mkdir()
    for name in ("server", "node"):
        made = subprocess.run([sys.executable, "-m", "stoker.supervisor", "keys", name, "--dir", str(folder)],
                              capture_output=True, text=True, timeout=30)
        assert made.returncode == 0, made.stderr
    shutil.copy(folder / "node.key", authorized / "node.key")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_supervisor(MODEL, endpoint=f"tcp://0.0.0.0:{port}", curve_server_key=str(folder / "server.key_secret"),
                     curve_authorized_keys=str(authorized), _wait=False)
    endpoint = f"tcp://127.0.0.1:{port}"
    expected = "".join(fake_complete("secure", 0, 5, 0)[0])
    by_option = node(node_client, "--endpoint", endpoint, "--model", "f", "--max-tokens", "5", "--timeout", "20",
                     "--server-key", str(folder / "server.key"), "--client-key", str(folder / "node.key_secret"),
                     "secure")
    assert by_option.returncode == 0 and by_option.stdout == expected + "\n", by_option.stderr
    env = {**os.environ, "STOKER_SERVER_KEY": str(folder / "server.key"),
           "STOKER_CLIENT_KEY": str(folder / "node.key_secret")}
    by_env = subprocess.run(["node", str(node_client), "--endpoint", endpoint, "--model", "f", "--max-tokens", "5",
                             "secure"], capture_output=True, text=True, timeout=60, env=env)
    assert by_env.returncode == 0 and by_env.stdout == expected + "\n", by_env.stderr
    without = node(node_client, "--endpoint", endpoint, "--model", "f", "--timeout", "2", "secure")
    assert without.returncode == 4 and without.stdout == ""  # nothing at all comes back
