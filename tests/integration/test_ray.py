"""`stoker batch --ray` on a simulated 3-node Ray cluster (ray.cluster_utils.Cluster) with fake
workers: 1,000 items, a node removed mid-run, then the driver killed mid-run and the command run
again; each time every id exactly once, every text the one a one-machine run gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import skip_or_fail_on_ci, wait_for

from .test_batch import lines

try:
    import ray  # noqa: F401
    from ray.cluster_utils import Cluster
except ImportError:
    Cluster = None

pytestmark = pytest.mark.timeout(600)

MODEL = '[models.f]\nbackend = "fake"\ntokens_per_second = 300\nend_every = 0\nembedding = true\nembedding_dim = 8\n'
CLI = [sys.executable, "-m", "stoker.supervisor"]
ENV = {**os.environ, "STOKER_RAY_SERVICE": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture
def cluster():
    if Cluster is None:
        skip_or_fail_on_ci("the ray extra is not installed")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    c = Cluster(initialize_head=True, connect=False,
                head_node_args={"num_cpus": 1, "resources": {"stoker": 1}, "include_dashboard": False})
    extra = [c.add_node(num_cpus=1, resources={"stoker": 1}) for _ in range(2)]
    c.wait_for_nodes()
    yield c, extra
    c.shutdown()


def write_items(path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "prompt": f"item {i}", "max_tokens": 6}) + "\n")


def texts(path) -> dict:
    got = lines(path)
    ids = [r["id"] for r in got]
    assert len(ids) == len(set(ids)), "an id written twice"
    assert all("error" not in r for r in got), [r for r in got if "error" in r][:3]
    return {r["id"]: r["text"] for r in got}


def test_a_thousand_items_survive_a_removed_node_and_a_killed_driver(start_supervisor, short_dir, cluster):
    c, extra = cluster
    sup = start_supervisor(MODEL, default_model="f")
    inp = short_dir / "in.jsonl"
    write_items(inp, 1000)
    # The one-machine run the cluster's texts must equal (seeds from the ids, as --ray gives).
    one = short_dir / "one.jsonl"
    done = subprocess.run(CLI + ["batch", str(inp), "-o", str(one), "--seed-by-id", "--config", str(sup.config_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reference = texts(one)
    assert len(reference) == 1000

    out = short_dir / "ray.jsonl"
    cmd = CLI + ["batch", str(inp), "-o", str(out), "--ray", c.address, "--config", str(sup.config_path)]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    wait_for(lambda: len(lines(out)) >= 250, 240, "a quarter of the items")
    c.remove_node(extra[0])
    _, stderr = job.communicate(timeout=400)
    assert job.returncode == 0, stderr
    assert "no more work for it" in stderr  # the removed node's chunks went elsewhere
    assert texts(out) == reference

    out2 = short_dir / "ray2.jsonl"
    cmd2 = CLI + ["batch", str(inp), "-o", str(out2), "--ray", c.address, "--config", str(sup.config_path)]
    job = subprocess.Popen(cmd2, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    wait_for(lambda: len(lines(out2)) >= 300, 240, "some items")
    job.send_signal(signal.SIGKILL)
    job.wait(30)
    first = len(lines(out2))
    assert first < 1000
    again = subprocess.run(cmd2, capture_output=True, text=True, timeout=400, env=ENV)
    assert again.returncode == 0, again.stderr
    assert f"{first} already in" in again.stderr
    assert texts(out2) == reference


def test_a_model_no_node_has_is_a_clear_error(start_supervisor, short_dir, cluster):
    c, _ = cluster
    sup = start_supervisor(MODEL, default_model="f")
    inp = short_dir / "in.jsonl"
    inp.write_text('{"id": 1, "prompt": "x", "model": "nowhere"}\n{"id": 2, "prompt": "y", "max_tokens": 2}\n')
    out = short_dir / "out.jsonl"
    done = subprocess.run(CLI + ["batch", str(inp), "-o", str(out), "--ray", c.address, "--config",
                                 str(sup.config_path)], capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 3, done.stderr
    got = {r["id"]: r for r in lines(out)}
    assert "no node of the cluster has model 'nowhere'" in got[1]["error"]["message"]
    assert got[2]["usage"]["completion_tokens"] == 2


def test_stoker_embed_runs_on_the_cluster_too(start_supervisor, short_dir, cluster):
    c, _ = cluster
    sup = start_supervisor(MODEL, default_model="f")
    inp = short_dir / "texts.jsonl"
    inp.write_text("".join(json.dumps({"id": f"t{i}", "text": f"text {i} about coal"}) + "\n" for i in range(90)))
    one, out = short_dir / "one.jsonl", short_dir / "ray.jsonl"
    done = subprocess.run(CLI + ["embed", str(inp), "-o", str(one), "--config", str(sup.config_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ran = subprocess.run(CLI + ["embed", str(inp), "-o", str(out), "--ray", c.address, "--batch-size", "10",
                                "--format", "npy", "--config", str(sup.config_path)],
                         capture_output=True, text=True, timeout=300, env=ENV)
    assert ran.returncode == 0, ran.stderr
    got = {r["id"]: r["embedding"] for r in lines(out)}
    assert len(lines(out)) == 90 and got == {r["id"]: r["embedding"] for r in lines(one)}
    assert (short_dir / "ray.npy").exists()


def test_parts_on_shared_storage_each_task_writes_its_own_file(start_supervisor, short_dir, cluster):
    c, _ = cluster
    sup = start_supervisor(MODEL, default_model="f")
    inp = short_dir / "in.jsonl"
    write_items(inp, 300)
    one = short_dir / "one.jsonl"
    done = subprocess.run(CLI + ["batch", str(inp), "-o", str(one), "--seed-by-id", "--config", str(sup.config_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    folder = short_dir / "parts"

    def part_lines() -> list[dict]:
        return [json.loads(x) for p in sorted(folder.glob("part-*.jsonl")) for x in p.read_text().splitlines()]

    cmd = CLI + ["batch", str(inp), "-o", str(folder), "--ray", c.address, "--parts", "--config", str(sup.config_path)]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    wait_for(lambda: folder.exists() and len(part_lines()) >= 60, 240, "some parts")
    job.send_signal(signal.SIGKILL)
    job.wait(30)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=ENV)
    assert again.returncode == 0, again.stderr
    got = part_lines()
    ids = [r["id"] for r in got]
    assert sorted(ids) == list(range(300)), "an id missing or in two parts"
    assert {r["id"]: r["text"] for r in got} == texts(one)
    assert not list(folder.glob("*.tmp"))


def test_an_address_that_does_not_answer_is_refused_at_once(start_supervisor, short_dir):
    if Cluster is None:
        skip_or_fail_on_ci("the ray extra is not installed")
    sup = start_supervisor(MODEL, default_model="f")
    inp = short_dir / "in.jsonl"
    write_items(inp, 3)
    for address, words in (("127.0.0.1:1", "no Ray cluster answers at 127.0.0.1:1"),
                           ("garbage", "is not a Ray address")):
        done = subprocess.run(CLI + ["batch", str(inp), "-o", str(short_dir / "out.jsonl"), "--ray", address,
                                     "--config", str(sup.config_path)], capture_output=True, text=True, timeout=120,
                              env=ENV)
        assert done.returncode == 2 and words in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_a_ray_of_its_own_beside_a_running_cluster_and_seed_wins_over_the_id(start_supervisor, short_dir, cluster):
    """No address and no RAY_ADDRESS: a Ray of its own, even with a cluster running on the machine
    (Ray alone would join that one); --seed S gives items without a seed S, as without Ray."""
    sup = start_supervisor(MODEL, default_model="f")
    inp = short_dir / "in.jsonl"
    write_items(inp, 30)
    local, remote = short_dir / "local.jsonl", short_dir / "ray.jsonl"
    done = subprocess.run(CLI + ["batch", str(inp), "-o", str(local), "--seed", "7", "--config", str(sup.config_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    env = {k: v for k, v in ENV.items() if k != "RAY_ADDRESS"}
    before = {p.name for p in __import__("pathlib").Path("/tmp").glob("stk-ray-*")}
    ran = subprocess.run(CLI + ["batch", str(inp), "-o", str(remote), "--ray", "--seed", "7", "--config",
                                str(sup.config_path)], capture_output=True, text=True, timeout=300, env=env)
    assert ran.returncode == 0, ran.stderr
    assert texts(remote) == texts(local)
    left = {p.name for p in __import__("pathlib").Path("/tmp").glob("stk-ray-*")} - before
    assert not left, f"the node's stoker folder was left: {left}"
