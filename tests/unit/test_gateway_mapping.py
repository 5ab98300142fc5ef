"""The gateway's mapping of the OpenAI and Ollama APIs onto stoker requests, and its API keys:
plain functions, checked on their own."""

from __future__ import annotations

import base64
import struct

import pytest

pytest.importorskip("starlette", reason="the http extra is not installed")

from stoker.gateway import ollama_api as ol  # noqa: E402
from stoker.gateway import openai_api as oa  # noqa: E402
from stoker.gateway.auth import Keys  # noqa: E402
from stoker.gateway.openai_api import ApiError  # noqa: E402


def test_chat_parameters_map_onto_stoker_keys():
    keys, n = oa.chat_request({
        "model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text",
                                                                                                  "text": "there"}]}],
        "max_completion_tokens": 9, "max_tokens": 99, "temperature": 0.5, "top_p": 0.9, "seed": -1, "stop": "x",
        "n": 2, "logprobs": True, "top_logprobs": 3, "response_format": {"type": "json_schema", "json_schema": {
            "name": "s", "schema": {"type": "object"}}}, "metadata": {"a": 1}, "frequency_penalty": 0})
    assert n == 2
    assert keys == {"max_tokens": 9, "temperature": 0.5, "top_p": 0.9, "seed": 2**32 - 1, "stop": ["x"],
                    "logprobs": 3, "response_format": {"type": "json_schema", "schema": {"type": "object"}},
                    "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]}


@pytest.mark.parametrize("body, param", [
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"logit_bias": {"1": 2}}, "logit_bias"),
    ({"wat": 1}, "wat"),
    ({"temperature": 3}, "temperature"),
    ({"n": 0}, "n"),
    ({"stop": [""]}, "stop"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"response_format": {"type": "xml"}}, "response_format"),
])
def test_what_stoker_cannot_do_is_a_400_naming_the_parameter(body, param):
    with pytest.raises(ApiError) as err:
        oa.chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}], **body})
    assert err.value.status == 400 and err.value.param == param


def test_completion_logprobs_and_base64_vectors_take_the_apis_shapes():
    entries = [{"token": "He", "bytes": [72, 101], "logprob": -0.5, "top_logprobs": [{"token": "He", "logprob": -0.5}]},
               {"token": "y", "bytes": [121], "logprob": -1.0, "top_logprobs": []}]
    assert oa.completion_logprobs(entries) == {"tokens": ["He", "y"], "token_logprobs": [-0.5, -1.0],
                                               "top_logprobs": [{"He": -0.5}, {}], "text_offset": [0, 2]}
    packed = oa.encode_vector([0.5, -1.25], "base64")
    assert struct.unpack("<2f", base64.b64decode(packed)) == (0.5, -1.25)
    assert oa.encode_vector([0.5], "float") == [0.5]


@pytest.mark.parametrize("value, seconds", [("5m", 300), ("1h30m", 5400), ("250ms", 0.25), ("0", 0), (0, 0),
                                            (12.5, 12.5), ("-1", ol.FOREVER_S), (-1, ol.FOREVER_S), (None, None)])
def test_ollama_keep_alive_durations(value, seconds):
    assert ol.keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "m", True, [1]])
def test_ollama_keep_alive_that_is_no_duration_is_a_400(value):
    with pytest.raises(ApiError, match="duration"):
        ol.keep_alive(value)


def test_ollama_options_format_and_templates():
    keys = ol.generate_request({"prompt": "hi", "system": "sys", "format": "json",
                                "options": {"num_predict": -1, "num_ctx": 8192, "seed": 3, "stop": "\n"}})
    # num_predict -1: as many as the supervisor allows (it caps max_tokens at max_tokens_limit)
    assert keys == {"seed": 3, "stop": ["\n"], "max_tokens": 2**31 - 1, "response_format": {"type": "json_object"},
                    "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]}
    assert ol.generate_request({"prompt": "hi", "raw": True}) == {"prompt": "hi"}
    with pytest.raises(ApiError, match="unknown option"):
        ol.options({"options": {"warp": 9}})
    with pytest.raises(ApiError, match="images"):
        ol.chat_request({"messages": [{"role": "user", "content": "x", "images": ["..."]}]})


def test_keys_name_callers_and_compare_every_key():
    keys = Keys(["alice:k1", "k2"])
    assert keys.required
    assert keys.caller("Bearer k1") == "alice"
    assert keys.caller("bearer k2").startswith("key-") and "k2" not in keys.caller("bearer k2")
    assert keys.caller("Bearer nope") is None and keys.caller(None) is None and keys.caller("Basic k1") is None
    assert Keys().caller(None) == "" and not Keys().required
