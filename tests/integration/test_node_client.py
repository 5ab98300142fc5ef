"""The protocol is language-neutral: the Node.js example client against a live supervisor.

Skipped when node (or npm, to install its two packages) is missing or the registry unreachable.
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

EXAMPLE = Path(__file__).resolve().parents[2] / "protocol" / "examples" / "node"
MODEL = '[models.f]\nbackend = "fake"\ntokens_per_second = 500\nend_every = 0\n'


@pytest.fixture(scope="module")
def node_client() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed")
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
            pytest.skip("npm install timed out (no registry?)")
        if npm.returncode != 0:
            pytest.skip(f"npm install failed (no registry?): {npm.stderr.strip()[-300:]}")
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

    unknown = node(node_client, "--endpoint", sup.endpoint, "--model", "nope", "x")
    assert unknown.returncode == 3 and json.loads(unknown.stderr)["code"] == "unknown_model"


def test_the_node_client_without_a_supervisor_exits_2(node_client, short_dir):
    out = node(node_client, "--endpoint", f"ipc://{short_dir}/none.sock", "x")
    assert out.returncode == 2 and "no supervisor" in out.stderr
