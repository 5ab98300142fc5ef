"""`stoker embed` against a real supervisor and fake workers: a corpus embedded in batches,
killed half-way and run again (every id exactly once), a text too long failing alone, and the
npy matrix with its ids."""

from __future__ import annotations

import json
import signal
import subprocess

import numpy as np

from tests.conftest import wait_for

from .test_batch import CLI, lines

MODEL = ('[models.e]\nbackend = "fake"\nembedding = true\nembedding_dim = 24\nembedding_ctx = 30\n'
         "tokens_per_second = 400\n")


def embed(sup, inp, out, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(CLI + ["embed", str(inp), "-o", str(out), "-m", "e", "--batch-size", "16",
                                   "--config", str(sup.config_path), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_half_way_and_run_again_every_id_once_then_npy(start_supervisor, short_dir):
    sup = start_supervisor(MODEL)
    inp, out = short_dir / "corpus.jsonl", short_dir / "vectors.jsonl"
    texts = {f"t{i}": f"text {i} about " + " ".join(["coal", "steam", "rail", "night"][: 1 + i % 4]) for i in range(600)}
    texts["long"] = " ".join(["w"] * 31)
    with inp.open("w") as f:
        for tid, text in texts.items():
            f.write(json.dumps({"id": tid, "text": text}) + "\n")
        f.write('{"id": "no-text"}\n')
    first = embed(sup, inp, out)
    wait_for(lambda: len(lines(out)) >= 150, 60, "a quarter of the corpus")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    done_first = len(lines(out))
    assert done_first < len(texts)
    second = embed(sup, inp, out, "--format", "npy")
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 3, stderr  # the long text failed
    assert 'line 602: needs "text"' in stderr
    got = lines(out)
    ids = [r["id"] for r in got]
    assert sorted(ids) == sorted(texts) and len(ids) == len(set(ids))  # every id exactly once
    by_id = {r["id"]: r for r in got}
    assert by_id["long"]["error"]["code"] == "bad_request" and "at most 30 tokens" in by_id["long"]["error"]["message"]
    assert all(len(r["embedding"]) == 24 for r in got if r["id"] != "long")
    matrix = np.load(short_dir / "vectors.npy")
    row_ids = json.loads((short_dir / "vectors.ids.json").read_text())
    assert matrix.shape == (600, 24) and row_ids == [f"t{i}" for i in range(600)]
    assert np.allclose(matrix[7], by_id["t7"]["embedding"]) and np.allclose(np.linalg.norm(matrix, axis=1), 1)
    assert f"{len(texts)} items: {done_first} already in" in stderr

    again = embed(sup, inp, out, "--truncate", "--retry-failed")
    _, stderr = again.communicate(timeout=60)
    assert again.returncode == 0, stderr
    assert len(lines(out)[-1]["embedding"]) == 24 and lines(out)[-1]["id"] == "long"
