"""The official `openai` package through the gateway to the real Gemma: chat and completion,
streaming and not, a JSON schema, logprobs and embeddings."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.integration.gateway_helpers import start_gateway  # noqa: F401

from .test_gemma import gemma

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.model

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                           "country": {"type": "string", "maxLength": 30}},
          "required": ["city", "country"], "additionalProperties": False}


def test_openai_sdk_against_gemma(start_supervisor, start_gateway):
    sup = start_supervisor(models=gemma(1024) + "embedding = true\nembedding_ctx = 128\n", default_model="gemma")
    gw = start_gateway(sup)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0, timeout=120)
    with sup.client(timeout=120) as c:
        direct = c.complete("The capital of France is", max_tokens=8, temperature=0).text
    comp = client.completions.create(model="gemma", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert comp.choices[0].text == direct  # the same greedy text as the ZeroMQ client gets
    parts = list(client.completions.create(model="gemma", prompt="The capital of France is", max_tokens=8,
                                           temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == direct
    chat = client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": "Say hello."}],
                                          max_tokens=16, temperature=0, logprobs=True, top_logprobs=2)
    assert chat.choices[0].message.content and chat.usage.completion_tokens > 0
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": "Say hello."}],
                                                 max_tokens=16, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    record = client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Where is the Eiffel Tower? Answer as JSON."}],
        max_tokens=80, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}})
    assert record.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(record.choices[0].message.content), SCHEMA)
    emb = client.embeddings.create(model="gemma", input=["a cat on a mat", "a cat sitting on a rug", "tax rates"])
    assert len(emb.data) == 3 and len(emb.data[0].embedding) == 640
    client.close()
