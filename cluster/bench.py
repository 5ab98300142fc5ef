"""Measure `stoker batch --ray` against `stoker batch` on this machine: items/s on a Ray of its
own (1 node) and on a simulated 3-node cluster (ray.cluster_utils.Cluster), and what the
cluster path costs before its first item is written. Every node shares this machine's cores:
this measures the overhead and the failure path, not a speed-up.

    python -m stoker.cluster.bench [--items 600] [--tokens-per-second 150]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-m", "stoker.supervisor"]


def _timed(cmd: list[str], out: Path, env: dict) -> tuple[float, float]:
    """Seconds to the first line written, and in all."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    first = None
    while proc.poll() is None:
        if first is None and out.exists() and out.stat().st_size:
            first = time.monotonic() - start
        time.sleep(0.01)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "failed")
    return first or 0.0, time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=600)
    ap.add_argument("--tokens-per-second", type=float, default=150)
    args = ap.parse_args()
    from ray.cluster_utils import Cluster

    folder = Path(tempfile.mkdtemp(prefix="stk-rb-", dir="/tmp"))
    cfg = folder / "c.toml"
    cfg.write_text(f'[supervisor]\nendpoint = "ipc://{folder}/s.sock"\nstate_dir = "{folder}/state"\n'
                   f'default_model = "f"\nmax_queue = 100000\n\n[models.f]\nbackend = "fake"\n'
                   f"tokens_per_second = {args.tokens_per_second}\nend_every = 0\n")
    inp = folder / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": f"item {i}", "max_tokens": 6}) + "\n"
                           for i in range(args.items)))
    env = {**os.environ, "STOKER_RAY_SERVICE": "0", "RAY_AUTH_MODE": "disabled"}
    sup = subprocess.Popen(CLI + ["serve", "--quiet", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    rows = []
    try:
        time.sleep(2)
        subprocess.run(CLI + ["load", "f", "--config", str(cfg)], check=True, capture_output=True)
        out = folder / "plain.jsonl"
        first, total = _timed(CLI + ["batch", str(inp), "-o", str(out), "--config", str(cfg)], out, env)
        rows.append(("stoker batch (no Ray)", first, total))
        out = folder / "ray1.jsonl"
        first, total = _timed(CLI + ["batch", str(inp), "-o", str(out), "--ray", "--config", str(cfg)], out, env)
        rows.append(("--ray, a Ray of its own (1 node)", first, total))
        os.environ["RAY_AUTH_MODE"] = "disabled"
        cluster = Cluster(initialize_head=True, connect=False,
                          head_node_args={"num_cpus": 1, "resources": {"stoker": 1}, "include_dashboard": False})
        try:
            for _ in range(2):
                cluster.add_node(num_cpus=1, resources={"stoker": 1})
            cluster.wait_for_nodes()
            out = folder / "ray3.jsonl"
            first, total = _timed(CLI + ["batch", str(inp), "-o", str(out), "--ray", cluster.address, "--config",
                                         str(cfg)], out, env)
            rows.append(("--ray ADDRESS, 3 simulated nodes", first, total))
        finally:
            cluster.shutdown()
    finally:
        sup.terminate()
        sup.wait(30)
    print(f"{args.items} items of 6 tokens, fake model at {args.tokens_per_second:g} tokens/s per worker, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| run | first line after (s) | total (s) | items/s |")
    print("| --- | --- | --- | --- |")
    for name, first, total in rows:
        print(f"| {name} | {first:.1f} | {total:.1f} | {args.items / total:.1f} |")


if __name__ == "__main__":
    main()
