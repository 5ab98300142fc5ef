"""Ollama's API as stoker requests, and stoker's replies as Ollama's responses (no I/O)."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Mapping

from stoker.gateway.openai_api import ApiError
from stoker.protocol.messages import Key

FOREVER_S = 10 * 365 * 24 * 3600.0  # a negative keep_alive: Ollama keeps the model loaded for good
DEFAULT_KEEP_ALIVE_S = 300.0  # Ollama's default (5m), which its callers expect

# options -> stoker sampling keys
_OPTIONS = {"temperature": Key.TEMPERATURE, "top_p": Key.TOP_P, "top_k": Key.TOP_K, "min_p": Key.MIN_P,
            "seed": Key.SEED, "repeat_penalty": Key.REPEAT_PENALTY, "stop": Key.STOP, "num_predict": Key.MAX_TOKENS}
# options that tune how Ollama runs a model (context size, threads, GPU layers, ...): stoker's
# model configuration decides those, so they are accepted and ignored (README).
IGNORED_OPTIONS = frozenset({"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep", "use_mmap",
                             "use_mlock", "numa", "low_vram", "vocab_only", "f16_kv", "typical_p", "repeat_last_n",
                             "tfs_z", "mirostat", "mirostat_tau", "mirostat_eta", "penalize_newline",
                             "presence_penalty", "frequency_penalty"})
_ROLES = frozenset({"system", "user", "assistant", "tool"})
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive(value: Any) -> float | None:
    """Ollama's keep_alive (a number of seconds, or a Go duration such as "5m", "1h30m", "0");
    negative: for good."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ApiError(400, "keep_alive must be a duration like \"5m\" or a number of seconds")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.lstrip("+-")
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = sign * float(text)
        else:
            parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ApiError(400, f"keep_alive {value!r} is not a duration (like \"5m\", \"1h\" or \"30s\")")
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise ApiError(400, "keep_alive must be a duration like \"5m\" or a number of seconds")
    return FOREVER_S if seconds < 0 else seconds


def options(body: Mapping[str, Any]) -> dict[str, Any]:
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "options must be an object")
    keys: dict[str, Any] = {}
    unknown = []
    for name, value in opts.items():
        if name in _OPTIONS:
            if value is None:
                continue
            if name == "num_predict" and isinstance(value, int) and not isinstance(value, bool) and value < 0:
                value = 2**31 - 1  # -1 (-2): until the model stops, within max_tokens_limit and the context
            if name == "num_predict" and (isinstance(value, bool) or not isinstance(value, int) or value == 0):
                raise ApiError(400, f"options.num_predict must be a positive integer or -1, not {value!r}")
            if name == "seed":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ApiError(400, f"options.seed must be an integer, not {value!r}")
                value %= 2**32
            if name == "stop":
                value = [value] if isinstance(value, str) else value
            keys[_OPTIONS[name]] = value
        elif name not in IGNORED_OPTIONS:
            unknown.append(name)
    if unknown:
        raise ApiError(400, f"unknown option(s): {', '.join(sorted(unknown))}")
    return keys


def stream(body: Mapping[str, Any]) -> bool:
    """`stream`: true (also when left out or null, Ollama's default) or false."""
    value = body.get("stream")
    if value is None:
        return True
    if not isinstance(value, bool):
        raise ApiError(400, "stream must be true or false")
    return value


def format_key(value: Any) -> dict[str, Any]:
    """Ollama's `format`: "json", or a JSON schema."""
    if value in (None, ""):
        return {}
    if value == "json":
        return {Key.RESPONSE_FORMAT: {Key.TYPE: "json_object"}}
    if isinstance(value, dict):
        return {Key.RESPONSE_FORMAT: {Key.TYPE: "json_schema", Key.SCHEMA: value}}
    raise ApiError(400, 'format must be "json" or a JSON schema (an object)')


def _refuse(body: Mapping[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        if body.get(name):
            raise ApiError(400, f"stoker does not support '{name}'")


def chat_request(body: Mapping[str, Any]) -> dict[str, Any]:
    _refuse(body, ("tools", "images"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content", ""), str):
            raise ApiError(400, f"messages[{i}] must have a role and text content")
        if m.get("images"):
            raise ApiError(400, "stoker does not support images")
        if m["role"] not in _ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}, not {m['role']!r}")
        chat.append({Key.ROLE: m["role"], Key.CONTENT: m.get("content", "")})
    return {Key.MESSAGES: chat, **options(body), **format_key(body.get("format"))}


def generate_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """/api/generate: raw sends the prompt as it is; otherwise, as Ollama does, it goes through the
    model's chat template (as the user's message, after `system` if given)."""
    _refuse(body, ("images", "template", "suffix", "context"))
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string")
    keys = {**options(body), **format_key(body.get("format"))}
    if body.get("raw"):
        keys[Key.PROMPT] = prompt
    else:
        chat = []
        if isinstance(body.get("system"), str) and body["system"]:
            chat.append({Key.ROLE: "system", Key.CONTENT: body["system"]})
        chat.append({Key.ROLE: "user", Key.CONTENT: prompt})
        keys[Key.MESSAGES] = chat
    return keys


def timestamp(after_s: float = 0.0) -> str:
    """Now (or `after_s` seconds from now, at most FOREVER_S), as Ollama writes times."""
    after_s = max(-FOREVER_S, min(float(after_s), FOREVER_S))  # a keep_alive of 1e12 s is "for good" too
    when = datetime.fromtimestamp(datetime.now(timezone.utc).timestamp() + after_s, timezone.utc)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


def final_fields(reason: str, usage: Mapping[str, int], timings: Mapping[str, float]) -> dict[str, Any]:
    """What Ollama's last message of a generation carries: durations in nanoseconds, counts."""
    ns = 1_000_000
    total, queued, ttft = timings.get(Key.TOTAL_MS, 0.0), timings.get(Key.QUEUED_MS, 0.0), timings.get(Key.TTFT_MS, 0.0)
    return {"done": True, "done_reason": "length" if reason == "length" else "stop",
            "total_duration": int(total * ns), "load_duration": int(timings.get(Key.LOAD_MS, 0.0) * ns),
            "prompt_eval_count": int(usage.get(Key.PROMPT_TOKENS, 0)),
            "prompt_eval_duration": int(max(0.0, ttft - queued) * ns),
            "eval_count": int(usage.get(Key.COMPLETION_TOKENS, 0)),
            "eval_duration": int(max(0.0, total - ttft) * ns)}
