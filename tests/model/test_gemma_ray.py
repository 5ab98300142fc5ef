"""`stoker batch --ray` with the real Gemma on 2 simulated Ray nodes: a small batch completes,
each id once, greedy texts equal to a one-machine run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import skip_or_fail_on_ci
from tests.integration.test_batch import lines

from .test_gemma import gemma

pytestmark = [pytest.mark.model, pytest.mark.timeout(600)]
CLI = [sys.executable, "-m", "stoker.supervisor"]


def test_gemma_on_two_simulated_nodes(start_supervisor, short_dir):
    try:
        from ray.cluster_utils import Cluster
    except ImportError:
        skip_or_fail_on_ci("the ray extra is not installed")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    sup = start_supervisor(models=gemma(512), default_model="gemma")
    inp = short_dir / "in.jsonl"
    with inp.open("w") as f:
        for i in range(40):
            f.write(json.dumps({"id": i, "prompt": f"Fact {i}: the number {i} is", "max_tokens": 6,
                                "temperature": 0}) + "\n")
    one = short_dir / "one.jsonl"
    done = subprocess.run(CLI + ["batch", str(inp), "-o", str(one), "--seed-by-id", "--config", str(sup.config_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "resources": {"stoker": 1}, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, resources={"stoker": 1})
        cluster.wait_for_nodes()
        out = short_dir / "ray.jsonl"
        env = {**os.environ, "STOKER_RAY_SERVICE": "0"}
        ran = subprocess.run(CLI + ["batch", str(inp), "-o", str(out), "--ray", cluster.address, "--config",
                                    str(sup.config_path)], capture_output=True, text=True, timeout=500, env=env)
        assert ran.returncode == 0, ran.stderr
        assert ran.stderr.count("stoker at ipc://") == 2  # a stoker on each node
    finally:
        cluster.shutdown()
    got = {r["id"]: r["text"] for r in lines(out)}
    assert len(lines(out)) == 40 and sorted(got) == list(range(40))
    # Greedy, each prompt run alone on a worker that ran others before: the same text.
    assert got == {r["id"]: r["text"] for r in lines(one)}
