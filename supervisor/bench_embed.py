"""Measure `stoker embed` on a corpus of short texts: texts/s against llama-cpp-python's own
create_embedding (all texts in one call) and one text per call, on the same inputs in one run;
and the resume check (the job killed half-way, run again: every id exactly once).

    python -m stoker.supervisor.bench_embed [--texts 2000] [--config FILE] [--model NAME]

Needs a model with `embedding = true` (the embedded demo model has it). Figures go to
docs/performance.md with the machine and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUBJECTS = ["The river", "A small bakery", "Our team", "The old library", "This phone", "The mountain road",
            "My neighbour", "The new policy", "A quiet cafe", "The football club"]
VERBS = ["opened", "closed", "changed", "improved", "surprised everyone", "was praised", "was criticised",
         "moved", "grew", "slowed down"]
WHEN = ["last week", "this morning", "in the spring", "after the storm", "during the festival"]


def corpus(n: int) -> list[str]:
    return [f"{SUBJECTS[i % 10]} {VERBS[(i // 10) % 10]} {WHEN[(i // 100) % 5]} (note {i})." for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=2000)
    ap.add_argument("--config", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    texts = corpus(args.texts)
    work = Path(tempfile.mkdtemp(prefix="stoker-bench-embed-"))
    inp, out = work / "corpus.jsonl", work / "vectors.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    cli = [sys.executable, "-m", "stoker.supervisor"]
    extra = (["--config", args.config] if args.config else []) + (["-m", args.model] if args.model else [])
    cmd = cli + ["embed", str(inp), "-o", str(out), "--batch-size", str(args.batch_size), *extra]

    def count() -> int:
        return out.read_bytes().count(b"\n") if out.exists() else 0

    # Warm: the model loaded, its embedding context made.
    warm = work / "warm.jsonl"
    warm.write_text(json.dumps({"id": 0, "text": "warm up"}) + "\n")
    subprocess.run(cli + ["embed", str(warm), "-o", str(work / "warm.out"), *extra], check=True, capture_output=True)
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    while count() < args.texts // 2:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    half, half_s = count(), time.monotonic() - started
    started = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True)
    rest_s = time.monotonic() - started
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == list(range(args.texts)), "an id missing or written twice"
    stoker_tps = args.texts / (half_s + rest_s)
    print(f"stoker embed, batch {args.batch_size}: killed after {half} lines ({half_s:.1f} s), rerun wrote "
          f"{args.texts - half} in {rest_s:.1f} s; every id exactly once; {stoker_tps:.1f} texts/s")

    one = work / "one.jsonl"
    n_one = min(200, args.texts)
    one.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts[:n_one])))
    started = time.monotonic()
    subprocess.run(cli + ["embed", str(one), "-o", str(work / "one.out"), "--batch-size", "1", "-j", "1", *extra],
                   check=True, capture_output=True)
    stoker_one = n_one / (time.monotonic() - started)
    print(f"stoker embed, one text per request: {stoker_one:.1f} texts/s")

    from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

    from stoker.workers.demo_model import ensure_demo_file

    path = str(ensure_demo_file()) if not args.config else os.environ.get("STOKER_BENCH_MODEL_PATH", "")
    llm = Llama(model_path=path, embedding=True, n_ctx=512, n_batch=512, n_ubatch=512,
                pooling_type=LLAMA_POOLING_TYPE_MEAN, verbose=False)
    started = time.monotonic()
    llm.create_embedding(texts)
    theirs = args.texts / (time.monotonic() - started)
    started = time.monotonic()
    for t in texts[:n_one]:
        llm.create_embedding(t)
    theirs_one = n_one / (time.monotonic() - started)
    print(f"llama-cpp-python create_embedding, all {args.texts} in one call: {theirs:.1f} texts/s; "
          f"one per call: {theirs_one:.1f} texts/s")
    print(f"ratios: stoker batched / stoker one per request {stoker_tps / stoker_one:.2f}; "
          f"stoker batched / create_embedding one per call {stoker_tps / theirs_one:.2f}; "
          f"stoker batched / create_embedding all at once {stoker_tps / theirs:.2f}")


if __name__ == "__main__":
    main()
