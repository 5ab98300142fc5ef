"""The OpenAI API's requests as stoker requests, and stoker's replies as the API's responses:
plain functions, no I/O (the app in stoker.gateway.app does the I/O).

Parameters stoker honours are mapped; optional hints it has no use for are ignored (IGNORED);
everything else that the API defines but stoker cannot do is refused with a 400 naming it, so a
caller never silently gets less than it asked for.
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Any, Mapping

from stoker.protocol.messages import Key

MAX_N = 16  # choices per request (each is a request of its own)

# Accepted and ignored: hints that change nothing stoker promises (say so in the README).
IGNORED = frozenset({"metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                     "safety_identifier", "modalities", "reasoning_effort", "verbosity"})
# Accepted only at the value that means "nothing": their absence is what stoker does.
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "tools": [], "tool_choice": "none",
           "functions": [], "function_call": "none", "echo": False, "best_of": 1, "suffix": "",
           "web_search_options": None, "prediction": None, "audio": None}

_CHAT_KEYS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
              "n", "user", "response_format", "logprobs", "top_logprobs", "stream", "stream_options"}
_COMPLETION_KEYS = {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "user",
                    "response_format", "logprobs", "stream", "stream_options"}


_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def seeds(keys: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """n copies of a choice's keys: with a seed, choice i gets seed + i, so the n choices are n
    samples (reproducible as a set), not one text n times."""
    if Key.SEED not in keys:
        return [dict(keys) for _ in range(n)]
    return [{**keys, Key.SEED: (keys[Key.SEED] + i) % 2**32} for i in range(n)]


class ApiError(Exception):
    """A request this API answers with an error: its status, message, and the parameter at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _check_keys(body: Mapping[str, Any], allowed: set[str]) -> None:
    refused = []
    for key, value in body.items():
        if key in allowed or key in IGNORED:
            continue
        if key in NEUTRAL and (value is None or value == NEUTRAL[key]):
            continue
        refused.append(key)
    if refused:
        raise ApiError(400, f"stoker does not support {', '.join(sorted(refused))} (at these values); "
                       "leave them out", refused[0], "unsupported_parameter")


def _number(body: Mapping[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"'{key}' must be a number from {low:g} to {high:g}", key)
    return value


def _int(body: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"'{key}' must be an integer from {low} to {high}", key)
    return value


def _typed(body: Mapping[str, Any], key: str, kind: type, what: str) -> None:
    value = body.get(key)
    if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
        raise ApiError(400, f"'{key}' must be {what}", key)


def common(body: Mapping[str, Any]) -> None:
    """The types of what every request may carry: a wrong one is refused, never read as truthy."""
    _typed(body, "model", str, "a string (a model's name)")
    _typed(body, "user", str, "a string")
    _typed(body, "stream", bool, "true or false")
    _typed(body, "stream_options", dict, "an object")
    if body.get("stream_options") is not None and not body.get("stream"):
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")


def sampling(body: Mapping[str, Any], chat: bool) -> tuple[dict[str, Any], int]:
    """The stoker keys for the sampling parameters, and n."""
    common(body)
    keys: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        keys[Key.MAX_TOKENS] = _int({"max_tokens": max_tokens}, "max_tokens", 1, 2**31)
    temperature = _number(body, "temperature", 0, 2)
    if temperature is not None:
        keys[Key.TEMPERATURE] = temperature
    top_p = _number(body, "top_p", 0, 1)
    if top_p is not None:
        keys[Key.TOP_P] = top_p
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ApiError(400, "'seed' must be an integer", "seed")
        keys[Key.SEED] = seed % 2**32
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > 16 or not all(isinstance(s, str) and s for s in stops):
            raise ApiError(400, "'stop' must be a string or a list of at most 16 non-empty strings", "stop")
        if stops:
            keys[Key.STOP] = stops
    fmt = body.get("response_format")
    if fmt is not None:
        keys.update(_response_format(fmt))
    if chat:
        _typed(body, "logprobs", bool, "true or false")
        if body.get("logprobs"):
            keys[Key.LOGPROBS] = _int(body, "top_logprobs", 0, 20) or 0
        elif body.get("top_logprobs") is not None:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    elif body.get("logprobs") is not None:
        keys[Key.LOGPROBS] = _int(body, "logprobs", 0, 5)
    n = _int(body, "n", 1, MAX_N) or 1
    return keys, n


def _response_format(fmt: Any) -> dict[str, Any]:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {Key.RESPONSE_FORMAT: {Key.TYPE: "json_object"}}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(400, "'response_format.json_schema.schema' must be a JSON schema (an object)",
                           "response_format")
        return {Key.RESPONSE_FORMAT: {Key.TYPE: "json_schema", Key.SCHEMA: schema}}
    raise ApiError(400, "'response_format.type' must be text, json_object or json_schema", "response_format")


def chat_messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    """The chat as stoker messages: text content only ("content" a string, or text parts)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role'", "messages")
        content = msg.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}]: stoker takes text content only", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
        if msg["role"] not in _ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}, not "
                           f"{msg['role']!r}", "messages")
        role = "system" if msg["role"] == "developer" else msg["role"]
        out.append({Key.ROLE: role, Key.CONTENT: content})
    return out


def chat_request(body: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """A chat completion's stoker generate keys (messages, model, sampling), and n."""
    _check_keys(body, _CHAT_KEYS)
    keys, n = sampling(body, chat=True)
    keys[Key.MESSAGES] = chat_messages(body)
    return keys, n


def completion_prompts(body: Mapping[str, Any]) -> list[str]:
    _check_keys(body, _COMPLETION_KEYS)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "'prompt' must be a string or a list of strings (token arrays are not supported)",
                       "prompt")
    return prompts


def finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def chat_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """stoker's entries are the API's `logprobs.content` already."""
    return None if entries is None else {"content": entries, "refusal": None}


def completion_logprobs(entries: list[dict[str, Any]] | None, offset: int = 0) -> dict[str, Any] | None:
    """The legacy completions shape: parallel lists, top alternatives as maps."""
    if entries is None:
        return None
    offsets, pos = [], offset
    for e in entries:
        offsets.append(pos)
        pos += len(e[Key.TOKEN])
    return {"tokens": [e[Key.TOKEN] for e in entries], "token_logprobs": [e[Key.LOGPROB] for e in entries],
            "top_logprobs": [{t[Key.TOKEN]: t[Key.LOGPROB] for t in e[Key.TOP_LOGPROBS]} for e in entries],
            "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())


def embedding_request(body: Mapping[str, Any]) -> tuple[list[str], bool, str]:
    """The texts, whether one string was sent, and the encoding format."""
    _check_keys(body, {"model", "input", "encoding_format", "user", "dimensions"})
    _typed(body, "model", str, "a string (a model's name)")
    _typed(body, "user", str, "a string")
    if body.get("dimensions") is not None:
        raise ApiError(400, "stoker does not support 'dimensions' (its vectors have the model's size)", "dimensions")
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ApiError(400, "'input' must be a string or a non-empty list of strings (token arrays are not "
                       "supported)", "input")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise ApiError(400, "'encoding_format' must be float or base64", "encoding_format")
    return texts, isinstance(value, str), encoding


def encode_vector(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
