"""Ollama's API over plain HTTP (httpx) against a live gateway and fake workers: each endpoint,
streaming (NDJSON) and not, keep_alive, loading by an empty prompt, errors in Ollama's shape."""

from __future__ import annotations

import json

import httpx
import pytest

from .gateway_helpers import start_gateway  # noqa: F401
from .test_gateway_openai import MODELS, SCHEMA


@pytest.fixture
def gw(start_supervisor, start_gateway):
    sup = start_supervisor(models=MODELS, default_model="f")
    return start_gateway(sup), sup


def ndjson(resp: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in resp.text.splitlines() if line.strip()]


def test_generate_and_chat_streaming_and_not(gw):
    g, _ = gw
    one = httpx.post(g.url + "/api/generate", json={"model": "f", "prompt": "hi", "stream": False,
                                                    "options": {"num_predict": 6, "seed": 4}}, timeout=30).json()
    assert one["done"] is True and one["done_reason"] == "length" and one["eval_count"] == 6
    assert one["model"] == "f" and one["response"] and one["total_duration"] > 0
    lines = ndjson(httpx.post(g.url + "/api/generate", json={"model": "f", "prompt": "hi",
                                                             "options": {"num_predict": 6, "seed": 4}}, timeout=30))
    assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"] and lines[-1]["eval_count"] == 6
    assert "".join(x["response"] for x in lines) == one["response"]
    raw = httpx.post(g.url + "/api/generate", json={"model": "f", "prompt": "hi", "raw": True, "stream": False,
                                                    "options": {"num_predict": 6, "seed": 4}}, timeout=30).json()
    assert raw["response"] != one["response"]  # raw: no chat template around the prompt
    chat = httpx.post(g.url + "/api/chat", json={"model": "f", "messages": [{"role": "user", "content": "hi"}],
                                                "stream": False, "options": {"num_predict": 6, "seed": 4}},
                      timeout=30).json()
    assert chat["message"]["role"] == "assistant" and chat["message"]["content"] == one["response"]
    streamed = ndjson(httpx.post(g.url + "/api/chat", json={"model": "f", "messages": [{"role": "user",
                                                                                      "content": "hi"}],
                                                          "options": {"num_predict": 6, "seed": 4}}, timeout=30))
    assert "".join(x["message"]["content"] for x in streamed) == chat["message"]["content"]
    assert streamed[-1]["done_reason"] == "length"
    fmt = httpx.post(g.url + "/api/chat", json={"model": "f", "messages": [{"role": "user", "content": "rec"}],
                                               "format": SCHEMA, "stream": False,
                                               "options": {"num_predict": 300}}, timeout=30).json()
    assert set(json.loads(fmt["message"]["content"])) >= {"name", "n"}


def test_embed_tags_ps_version_and_keep_alive(gw):
    g, sup = gw
    emb = httpx.post(g.url + "/api/embed", json={"model": "f", "input": ["a b", "c d"]}, timeout=30).json()
    assert len(emb["embeddings"]) == 2 and len(emb["embeddings"][0]) == 16 and emb["prompt_eval_count"] == 4
    tags = httpx.get(g.url + "/api/tags").json()
    assert {"f", "tiny"} <= {m["name"] for m in tags["models"]}
    ps = httpx.get(g.url + "/api/ps").json()
    assert [m["name"] for m in ps["models"]] == ["f"]
    assert httpx.get(g.url + "/api/version").json()["version"]
    loaded = httpx.post(g.url + "/api/generate", json={"model": "tiny"}, timeout=30).json()
    assert loaded["done_reason"] == "load"
    assert "tiny" in {m["name"] for m in httpx.get(g.url + "/api/ps").json()["models"]}
    gone = httpx.post(g.url + "/api/generate", json={"model": "tiny", "keep_alive": 0}, timeout=30).json()
    assert gone["done_reason"] == "unload"
    assert "tiny" not in {m["name"] for m in httpx.get(g.url + "/api/ps").json()["models"]}
    # keep_alive "0" on a request: the model is unloaded once it ends
    httpx.post(g.url + "/api/generate", json={"model": "tiny", "prompt": "x", "keep_alive": "0s", "stream": False,
                                              "options": {"num_predict": 1}}, timeout=30)
    from tests.conftest import wait_for

    wait_for(lambda: not sup.workers("tiny"), 10, "tiny to unload after its request")


def test_errors_in_ollamas_shape(gw):
    g, _ = gw
    missing = httpx.post(g.url + "/api/generate", json={"model": "nope", "prompt": "x"}, timeout=30)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    bad = httpx.post(g.url + "/api/chat", json={"model": "f", "messages": [{"role": "user", "content": "x"}],
                                               "options": {"wat": 1}}, timeout=30)
    assert bad.status_code == 400 and "wat" in bad.json()["error"]
    dur = httpx.post(g.url + "/api/generate", json={"model": "f", "prompt": "x", "keep_alive": "soon"}, timeout=30)
    assert dur.status_code == 400 and "duration" in dur.json()["error"]
    assert httpx.post(g.url + "/api/embed", json={"model": "tiny", "input": "x"}, timeout=30).status_code == 400


def test_the_ollama_python_library_works_unchanged(gw):
    ollama = pytest.importorskip("ollama")
    g, _ = gw
    client = ollama.Client(host=g.url)
    chat = client.chat(model="f", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 5, "seed": 1})
    assert chat.message.content and chat.done_reason == "length" and chat.eval_count == 5
    whole = client.generate(model="f", prompt="hi", options={"num_predict": 4, "seed": 2})
    parts = list(client.generate(model="f", prompt="hi", stream=True, options={"num_predict": 4, "seed": 2}))
    # Tokens that pile up behind a slow reader are merged into one chunk, so count tokens, not chunks.
    assert parts[-1].done and parts[-1].eval_count == 4 and len(parts) >= 2
    assert "".join(p.response for p in parts) == whole.response
    assert len(client.embed(model="f", input=["a b", "c"]).embeddings) == 2
    assert "f" in [m.model for m in client.list().models]
    assert [m.model for m in client.ps().models] == ["f"]
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404


def test_health_and_metrics(gw):
    pytest.importorskip("prometheus_client")
    g, sup = gw
    httpx.post(g.url + "/api/generate", json={"model": "f", "prompt": "x", "stream": False,
                                              "options": {"num_predict": 2}}, timeout=30)
    text = httpx.get(g.url + "/metrics").text
    assert 'stoker_gateway_requests_total{api="ollama",model="f",outcome="length"} 1.0' in text
    assert httpx.get(g.url + "/health").json()["status"] == "ok"
    sup.stop()
    down = httpx.get(g.url + "/health", timeout=10)
    assert down.status_code == 503 and down.json()["status"] == "unavailable"
