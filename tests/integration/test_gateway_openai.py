"""The official `openai` package against a live gateway and supervisor with fake workers: chat and
completions, streaming and not, stream_options, stop, seeds, n, a JSON schema, logprobs,
embeddings, and errors in the API's own shape (unknown model, bad parameter, overload, keys)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

openai = pytest.importorskip("openai")

from .gateway_helpers import start_gateway  # noqa: E402,F401

MODELS = """
[models.f]
backend = "fake"
tokens_per_second = 400
end_every = 0
embedding = true
embedding_dim = 16

[models.tiny]
backend = "fake"
tokens_per_second = 20
end_every = 0
"""
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["name", "n"]}


@pytest.fixture
def api(start_supervisor, start_gateway):
    sup = start_supervisor(models=MODELS, default_model="f")
    gw = start_gateway(sup)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0, timeout=30)
    yield client, sup, gw
    client.close()


def test_models_chat_and_completion_streaming_and_not(api):
    client, _, _ = api
    ids = {m.id for m in client.models.list()}
    assert {"f", "tiny"} <= ids
    chat = client.chat.completions.create(model="f", messages=[{"role": "user", "content": "hello"}], max_tokens=7,
                                          seed=3)
    assert chat.object == "chat.completion" and chat.model == "f" and chat.id.startswith("chatcmpl-")
    assert chat.choices[0].finish_reason == "length" and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 7 and chat.usage.total_tokens == chat.usage.prompt_tokens + 7
    text = chat.choices[0].message.content
    streamed = client.chat.completions.create(model="f", messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=7, seed=3, stream=True,
                                              stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    comp = client.completions.create(model="f", prompt="once upon", max_tokens=5, seed=1)
    assert comp.object == "text_completion" and comp.choices[0].finish_reason == "length"
    parts = list(client.completions.create(model="f", prompt="once upon", max_tokens=5, seed=1, stream=True))
    assert "".join(p.choices[0].text for p in parts) == comp.choices[0].text


def test_seed_reproducibility_stop_n_and_max_completion_tokens(api):
    client, _, _ = api
    msgs = [{"role": "user", "content": "tell me"}]
    a = client.chat.completions.create(model="f", messages=msgs, max_tokens=12, seed=42, temperature=0.7)
    b = client.chat.completions.create(model="f", messages=msgs, max_tokens=12, seed=42, temperature=0.7)
    c = client.chat.completions.create(model="f", messages=msgs, max_tokens=12, seed=43, temperature=0.7)
    assert a.choices[0].message.content == b.choices[0].message.content != c.choices[0].message.content
    words = a.choices[0].message.content.split(" ")
    stop = " " + words[3]
    cut = client.chat.completions.create(model="f", messages=msgs, max_tokens=12, seed=42, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].message.content
    assert a.choices[0].message.content.startswith(cut.choices[0].message.content)
    three = client.chat.completions.create(model="f", messages=msgs, max_completion_tokens=4, seed=42, n=3)
    assert [ch.index for ch in three.choices] == [0, 1, 2] and three.usage.completion_tokens == 12
    streamed = list(client.chat.completions.create(model="f", messages=msgs, max_tokens=4, seed=42, n=2,
                                                   stream=True))
    texts = {0: "", 1: ""}
    for chunk in streamed:
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
    # With a seed, choice i runs with seed + i: n samples, reproducible as a set.
    assert [texts[0], texts[1]] == [three.choices[0].message.content, three.choices[1].message.content]
    assert len({ch.message.content for ch in three.choices}) == 3


def test_json_schema_logprobs_and_embeddings(api):
    client, _, _ = api
    out = client.chat.completions.create(
        model="f", messages=[{"role": "user", "content": "a record"}], max_tokens=300,
        response_format={"type": "json_schema", "json_schema": {"name": "rec", "schema": SCHEMA}})
    jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    lp = client.chat.completions.create(model="f", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                        logprobs=True, top_logprobs=2)
    content = lp.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == lp.choices[0].message.content
    emb = client.embeddings.create(model="f", input=["the red engine", "the red engine", "a brass valve"])
    vectors = [d.embedding for d in emb.data]
    assert len(vectors) == 3 and len(vectors[0]) == 16 and vectors[0] == vectors[1] != vectors[2]
    assert emb.usage.prompt_tokens == 9
    floats = client.embeddings.create(model="f", input="the red engine", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(vectors[0], abs=1e-6)


def test_errors_in_the_apis_shape(api):
    client, sup, gw = api
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="f", messages=[{"role": "user", "content": "x"}], temperature=5)
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        client.chat.completions.create(model="f", messages=[{"role": "user", "content": "x"}], frequency_penalty=1)
    with pytest.raises(openai.BadRequestError, match="does not serve embeddings"):
        client.embeddings.create(model="tiny", input="x")
    bad = httpx.post(gw.url + "/v1/chat/completions", content=b"{nope")
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_overload_is_a_429_with_retry_after(start_supervisor, start_gateway):
    sup = start_supervisor(models=MODELS, default_model="tiny", max_queue=2)
    gw = start_gateway(sup)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0, timeout=30)
    import threading

    def long() -> None:
        try:
            client.completions.create(model="tiny", prompt="x", max_tokens=60, user="flood")
        except openai.APIError:
            pass

    with sup.client() as c:
        c.load("tiny")  # loaded: the first request runs at once, so the queue holds the next two
    threads = [threading.Thread(target=long) for _ in range(6)]  # 1 running, 2 queued, the rest refused
    for t in threads:
        t.start()
    from tests.conftest import wait_for

    with sup.client() as c:
        wait_for(lambda: c.status()["queues"].get("tiny", 0) >= 2, 20, "the queue to fill")
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model="tiny", prompt="x", max_tokens=2, user="flood")
    assert err.value.response.headers["retry-after"] == "1"
    with sup.client() as c:  # cancel the rest
        c.unload("tiny")
    for t in threads:
        t.join(30)
    client.close()
