"""The `embed` op through a real supervisor and fake workers: a vector per input, in order,
deterministic, normalized unless asked not to; bad requests refused before anything runs (the
worker serves on); an embed beside generations; cancel; a worker killed mid-job resumed with the
inputs it had not done; and the same from AsyncClient."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time

import pytest

from stoker.protocol.async_client import AsyncClient
from stoker.protocol.client import Client
from stoker.protocol.errors import BadRequest

from tests.conftest import wait_for

from .helpers import raw_socket, recv, send

EMB = """
[models.emb]
backend = "fake"
embedding = true
embedding_dim = 32
embedding_ctx = 40
load_seconds = 0.2

[models.slow]
backend = "fake"
embedding = true
embedding_dim = 16
tokens_per_second = 200
load_seconds = 0.2

[models.plain]
backend = "fake"
"""


def cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_one_vector_per_input_in_order_normalized_and_repeatable(start_supervisor):
    sup = start_supervisor(models=EMB, default_model="emb")
    texts = ["the red engine runs", "the red engine turns", "a brass whistle at night", "the red engine runs"]
    with Client(sup.endpoint, timeout=30) as c:
        got = c.embed(texts)
        one = c.embed("the red engine runs")
        raw = c.embed(texts, normalize=False)
    assert got.model == "emb" and len(got.embeddings) == 4 and len(one.embeddings) == 1
    assert all(len(v) == 32 for v in got.embeddings)
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-5) for v in got.embeddings)
    assert got.embeddings[0] == got.embeddings[3] == one.embeddings[0]
    assert cos(got.embeddings[0], got.embeddings[1]) > cos(got.embeddings[0], got.embeddings[2])
    assert got.usage["prompt_tokens"] == 4 + 4 + 5 + 4
    assert sum(abs(x) for x in raw.embeddings[0]) > 1.5  # not unit length: the words' counts
    assert cos(raw.embeddings[2], got.embeddings[2]) == pytest.approx(1.0)


def test_bad_embeds_are_bad_requests_and_the_worker_serves_on(start_supervisor):
    sup = start_supervisor(models=EMB, default_model="emb")
    long = " ".join(["word"] * 41)
    with Client(sup.endpoint, timeout=30) as c:
        assert len(c.embed("warm").embeddings) == 1
        [worker] = sup.workers("emb")
        cases = [
            (dict(input=[]), "'input' must be a string or a list of 1 to 256 strings"),
            (dict(input=""), "'input' must be a non-empty string"),
            (dict(input=["a", ""]), r"input\[1\] must be a non-empty string"),
            (dict(input=["a"] * 257), "a list of 1 to 256 strings"),
            (dict(input=["a", 5]), r"input\[1\] must be a non-empty string"),
            (dict(input="a", normalize="yes"), "'normalize' must be true or false"),
            (dict(input=["ok", long]), r"input\[1\] is 41 tokens.*at most 40 tokens.*truncate"),
            (dict(input="a", model="plain"), "model 'plain' does not serve embeddings"),
        ]
        for keys, words in cases:
            with pytest.raises(BadRequest, match=words):
                c.embed(**keys)
        cut = c.embed(["ok", long], truncate=True)
        assert cut.usage["prompt_tokens"] == 1 + 40
        [same] = sup.workers("emb")
        assert same["pid"] == worker["pid"]
    sock = raw_socket(sup.endpoint)
    send(sock, op="embed", id=1, input="x", prompt="y")
    assert "does not take key(s): prompt" in recv(sock)["message"]
    sock.close()


def test_embeds_run_beside_generations_and_can_be_cancelled(start_supervisor):
    sup = start_supervisor(models=EMB, default_model="slow")
    with Client(sup.endpoint, timeout=30) as c:
        stream = c.generate("a story", max_tokens=30)
        vectors = c.embed([f"text number {i}" for i in range(20)])  # waits for the one slot
        assert len(vectors.embeddings) == 20 and stream.complete().usage["completion_tokens"] > 0
    sock = raw_socket(sup.endpoint)
    send(sock, op="embed", id="big", input=[" ".join(["w"] * 30)] * 200)  # 30 s at 200 words/s
    assert recv(sock)["ev"] == "info"
    wait_for(lambda: sup.workers("slow", state="busy"), 10, "the big embed to run")
    send(sock, op="cancel", id="c", target="big")
    replies = [recv(sock), recv(sock)]
    end = next(r for r in replies if r["id"] == "big")
    assert end["ev"] == "end" and end["reason"] == "cancelled"
    assert next(r for r in replies if r["id"] == "c")["data"] == {"cancelled": True}
    sock.close()
    with Client(sup.endpoint, timeout=30) as c:
        assert len(c.embed("after").embeddings) == 1  # the slot is free again


def test_a_worker_killed_mid_embed_resumes_with_the_inputs_left(start_supervisor):
    sup = start_supervisor(models=EMB, default_model="slow")
    texts = [f"item {i} " + " ".join(["w"] * 8) for i in range(100)]  # 1,000 words: 5 s
    with Client(sup.endpoint, timeout=30) as c:
        whole = c.embed(texts[:3])
        started = time.monotonic()
        sock = raw_socket(sup.endpoint)
        send(sock, op="embed", id="k", input=texts)
        [w] = sup.workers("slow")
        time.sleep(1.5)
        os.kill(w["pid"], signal.SIGKILL)
        while True:
            msg = recv(sock, timeout=60)
            if msg["ev"] != "info":
                break
        sock.close()
    assert msg["ev"] == "result", msg
    data = msg["data"]
    assert len(data["embeddings"]) == 100 and data["embeddings"][:3] == whole.embeddings
    assert data["usage"]["prompt_tokens"] == 1000  # every input counted once: the done ones not run again
    assert time.monotonic() - started < 5 + 4.5  # not the whole 5 s again after the kill


def test_async_client_embeds(start_supervisor):
    sup = start_supervisor(models=EMB, default_model="emb")

    async def main() -> list:
        async with AsyncClient(sup.endpoint, timeout=30) as c:
            return await asyncio.gather(*(c.embed([f"x {i}", "y"]) for i in range(5)))

    results = asyncio.run(main())
    assert [len(r.embeddings) for r in results] == [2] * 5
    assert all(r.embeddings[1] == results[0].embeddings[1] for r in results)
