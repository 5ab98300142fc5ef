"""Embeddings from the real Gemma: vectors of the model's dimension, a text's cosine with itself
1, a paraphrase closer than an unrelated text (three hand-picked triples), stoker's vectors equal
to llama-cpp-python's own create_embedding, bad embeds refused with the worker serving on, and
`stoker embed` killed half-way then run again: every id exactly once."""

from __future__ import annotations

import json
import signal
import subprocess

import numpy as np
import pytest

from stoker.protocol.errors import BadRequest
from tests.conftest import wait_for
from tests.integration.test_batch import CLI, lines

from .test_gemma import gemma

pytestmark = pytest.mark.model

TRIPLES = [
    ("The cat sat on the mat.", "A cat was sitting on the rug.", "Interest rates rose by half a percent."),
    ("How do I reset my password?", "What are the steps to change my login password?",
     "The volcano erupted last night."),
    ("The train to Paris leaves at noon.", "At 12 o'clock the Paris train departs.",
     "She planted tomatoes in her garden."),
]
N_EMBD = 640  # Gemma 3 270M's hidden size


def cos(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def model(ctx: int = 128) -> str:
    return gemma(1024) + f"embedding = true\nembedding_ctx = {ctx}\n" + '[models.plain]\nbackend = "fake"\n'


def test_vectors_cosines_and_llama_cpp_pythons_own(start_supervisor):
    sup = start_supervisor(models=model(), default_model="gemma")
    texts = [t for triple in TRIPLES for t in triple]
    with sup.client(timeout=120) as c:
        got = c.embed(texts)
        alone = c.embed(texts[0])
        raw = c.embed(texts, normalize=False)
    assert len(got.embeddings) == 9 and all(len(v) == N_EMBD for v in got.embeddings)
    assert cos(got.embeddings[0], alone.embeddings[0]) == pytest.approx(1.0, abs=1e-5)
    assert all(np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5) for v in got.embeddings)
    for i in range(0, 9, 3):
        text, para, other = got.embeddings[i:i + 3]
        assert cos(text, text) == pytest.approx(1.0)
        assert cos(text, para) > cos(text, other), TRIPLES[i // 3]

    from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

    from stoker.workers.demo_model import ensure_demo_file

    llm = Llama(model_path=str(ensure_demo_file()), embedding=True, n_ctx=512, n_batch=512, n_ubatch=512,
                pooling_type=LLAMA_POOLING_TYPE_MEAN, verbose=False)
    theirs = [d["embedding"] for d in llm.create_embedding(texts)["data"]]
    llm.close()
    for mine, ref in zip(raw.embeddings, theirs):
        # The same pooled hidden states; a batch of another shape rounds them a little differently.
        assert cos(mine, ref) > 0.9999
        assert np.allclose(mine, ref, rtol=0.02, atol=0.02)


def test_bad_embeds_are_bad_requests_and_the_worker_serves_on(start_supervisor):
    sup = start_supervisor(models=model(ctx=32), default_model="gemma")
    with sup.client(timeout=120) as c:
        assert len(c.embed("warm up").embeddings) == 1
        [worker] = sup.workers("gemma")
        with pytest.raises(BadRequest, match=r"input\[1\] is \d+ tokens.*at most 32 tokens"):
            c.embed(["short", "a long text " * 20])
        with pytest.raises(BadRequest, match="non-empty string"):
            c.embed("")
        with pytest.raises(BadRequest, match="does not serve embeddings"):
            c.embed("x", model="plain")
        assert len(c.embed(["short", "a long text " * 20], truncate=True).embeddings) == 2
        assert c.complete("The capital of France is", max_tokens=4, temperature=0).text  # generation still works
        [same] = sup.workers("gemma")
        assert same["pid"] == worker["pid"]


def test_stoker_embed_killed_half_way_and_run_again(start_supervisor, short_dir):
    sup = start_supervisor(models=model(), default_model="gemma")
    inp, out = short_dir / "corpus.jsonl", short_dir / "vectors.jsonl"
    with inp.open("w") as f:
        for i in range(240):
            f.write(json.dumps({"id": i, "text": f"Note {i}: the shipment of {i % 13} crates left the port."}) + "\n")
    cmd = CLI + ["embed", str(inp), "-o", str(out), "--config", str(sup.config_path), "--batch-size", "16"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(lines(out)) >= 64, 180, "a quarter of the corpus")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    second = subprocess.run(cmd + ["--format", "npy"], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    ids = [r["id"] for r in lines(out)]
    assert sorted(ids) == list(range(240))  # every id exactly once
    assert np.load(short_dir / "vectors.npy").shape == (240, N_EMBD)


def test_pooling_setting_picks_how_the_vector_is_made():
    """mean, cls (the first token's state) and last (the last token's) are three different vectors
    of the same text; with one token, all three are that token's."""
    from stoker.supervisor.config import ModelConfig
    from stoker.workers.demo_model import ensure_demo_file
    from stoker.workers.llama_backend import LlamaBackend

    backend = LlamaBackend(ModelConfig(name="g", path=str(ensure_demo_file()), n_ctx=256, embedding=True,
                                       embedding_ctx=64))
    backend.load()
    vectors = {}
    for pooling in ("mean", "cls", "last"):
        backend.model = ModelConfig(name="g", path=backend.model.path, n_ctx=256, embedding=True, embedding_ctx=64,
                                    pooling=pooling)
        embedder = backend.embedder()
        embedder.admit(1, ["The train to Paris leaves at noon."], False, False)
        [out, _] = embedder.step()
        vectors[pooling] = np.asarray(out.vectors[0])
        embedder.ctx.close()
    assert cos(vectors["mean"], vectors["cls"]) < 0.99 and cos(vectors["mean"], vectors["last"]) < 0.99
    assert cos(vectors["cls"], vectors["last"]) < 0.99
    backend.llm.close()
