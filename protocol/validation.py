"""Turn a decoded request map into a typed request, or raise the protocol error it deserves."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from stoker.protocol.codec import decode
from stoker.protocol.errors import BadRequest, UnsupportedVersion
from stoker.protocol.messages import PROTOCOL_VERSION, Key, Message, Op, RequestId

MAX_ID_BYTES = 256
MAX_STOP_STRINGS = 16
MAX_GRAMMAR_CHARS = 65536  # a GBNF grammar; a schema is bounded by the message size alone
MAX_EMBED_INPUTS = 256  # strings in one embed (a result of 256 vectors of 4,096 floats is about 9 MiB)
MAX_LOGPROBS = 20  # alternatives per token a request may ask for (the OpenAI API's top_logprobs limit)
RESPONSE_TYPES = ("json_object", "json_schema")
MAX_PRIORITY = 1000
_INT64 = (-(2**63), 2**64 - 1)
_COMMON = frozenset({Key.V, Key.OP, Key.ID})


@dataclass(frozen=True)
class Request:
    """A valid request of an op with no extra keys (status, models, ping, shutdown)."""

    id: str | int
    op: Op


@dataclass(frozen=True)
class ModelRequest(Request):
    """load / unload: names a model."""

    model: str = ""
    pin: bool = False  # load only: never evict it or unload it for idleness (until `unload`)
    keep_alive: float | None = None  # load only: idle this long once loaded (None: the idle timeout)


@dataclass(frozen=True)
class CancelRequest(Request):
    """cancel: names the id of a generate request of the same client."""

    target: str | int = ""


@dataclass(frozen=True)
class GenerateRequest(Request):
    """generate: a prompt or chat messages, sampling keys, and how long to keep the model. (An
    embed is one too, with `inputs` instead of a prompt: the same life in the supervisor.)"""

    model: str | None = None
    prompt: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None
    sampling: Mapping[str, Any] = field(default_factory=dict)
    keep_alive: float | None = None
    priority: int = 0  # higher is served first; equal priorities take turns by client
    # A continuation: the completion so far (text, and how many tokens it was) of a request that
    # a supervisor which went away had begun; this one streams on from token `resume_tokens`.
    resume_text: str = ""
    resume_tokens: int = 0
    deadline: float | None = None  # seconds after acceptance; then it ends with `timeout`
    user: str | None = None  # whom the fair queue counts it for (None: its connection)


@dataclass(frozen=True)
class EmbedRequest(GenerateRequest):
    """embed: one vector per input string. Queued, scheduled, cancelled, timed out and resumed
    after a worker's death as a generate is (resumed: the inputs not yet embedded run again)."""

    inputs: tuple[str, ...] = ()
    single: bool = False  # `input` was one string, not a list
    normalize: bool = True
    truncate: bool = False


def _show(value: Any, limit: int = 80) -> str:
    """A value quoted in an error message, cut short: a reply must stay small whatever was sent."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _valid_id(value: Any) -> bool:
    if _is_int(value):
        return _INT64[0] <= value <= _INT64[1]
    return isinstance(value, str) and len(value.encode("utf-8", "surrogatepass")) <= MAX_ID_BYTES


def request_id_of(msg: Mapping[str, Any]) -> RequestId:
    """The id to echo in an error about `msg`: its id if that id is valid, else None."""
    value = msg.get(Key.ID)
    return value if _valid_id(value) else None


def request_id_of_frame(frame: bytes, max_bytes: int) -> RequestId:
    """request_id_of for an encoded request (None if it does not decode within max_bytes)."""
    try:
        msg = decode(frame, max_bytes)
    except Exception:
        return None
    return request_id_of(msg) if isinstance(msg, Mapping) else None


def _response_format(value: Any) -> bool:
    if not isinstance(value, dict) or value.get(Key.TYPE) not in RESPONSE_TYPES:
        return False
    if value[Key.TYPE] == "json_object":
        return set(value) == {Key.TYPE}
    return set(value) == {Key.TYPE, Key.SCHEMA} and isinstance(value[Key.SCHEMA], dict)


# Each sampling key: (check, what the check requires, for the error message).
_SAMPLING_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    Key.MAX_TOKENS: (lambda x: _is_int(x) and x >= 1, "an integer >= 1"),
    Key.TEMPERATURE: (lambda x: _is_number(x) and x >= 0, "a number >= 0"),
    Key.TOP_P: (lambda x: _is_number(x) and 0 <= x <= 1, "a number from 0 to 1"),
    Key.TOP_K: (lambda x: _is_int(x) and x >= 0, "an integer >= 0"),
    Key.MIN_P: (lambda x: _is_number(x) and 0 <= x <= 1, "a number from 0 to 1"),
    Key.REPEAT_PENALTY: (lambda x: _is_number(x) and x > 0, "a number > 0"),
    Key.SEED: (lambda x: _is_int(x) and -1 <= x < 2**32, "an integer from 0 to 2**32-1, or -1 for random"),
    Key.STOP: (
        lambda x: isinstance(x, list)
        and len(x) <= MAX_STOP_STRINGS
        and all(isinstance(s, str) and s for s in x),
        f"a list of at most {MAX_STOP_STRINGS} non-empty strings",
    ),
    # Keys that constrain what is generated: checked like sampling keys, and sent to the worker with them.
    Key.RESPONSE_FORMAT: (
        _response_format,
        '{"type": "json_object"} or {"type": "json_schema", "schema": {...}} (a JSON schema, as a map)',
    ),
    Key.GRAMMAR: (
        lambda x: isinstance(x, str) and 0 < len(x) <= MAX_GRAMMAR_CHARS,
        f"a GBNF grammar: a non-empty string of at most {MAX_GRAMMAR_CHARS} characters",
    ),
    # Asks for each token's log-probability and this many alternatives: sent to the worker too.
    Key.LOGPROBS: (lambda x: _is_int(x) and 0 <= x <= MAX_LOGPROBS,
                   f"an integer from 0 to {MAX_LOGPROBS} (how many alternatives per token)"),
}
_GENERATE_KEYS = (_COMMON | {Key.MODEL, Key.PROMPT, Key.MESSAGES, Key.KEEP_ALIVE, Key.PRIORITY, Key.RESUME,
                            Key.DEADLINE, Key.USER} | set(_SAMPLING_RULES))
_ALLOWED_KEYS: dict[Op, frozenset[str]] = {
    Op.GENERATE: frozenset(_GENERATE_KEYS),
    Op.EMBED: _COMMON | {Key.MODEL, Key.INPUT, Key.NORMALIZE, Key.TRUNCATE, Key.KEEP_ALIVE, Key.PRIORITY,
                         Key.DEADLINE, Key.USER},
    Op.CANCEL: _COMMON | {Key.TARGET},
    Op.LOAD: _COMMON | {Key.MODEL, Key.PIN, Key.KEEP_ALIVE},
    Op.UNLOAD: _COMMON | {Key.MODEL},
}


def parse_request(msg: Message) -> Request:
    """Validate a decoded request map. Raises BadRequest or UnsupportedVersion carrying the id."""
    rid = request_id_of(msg)
    if Key.ID not in msg:
        raise BadRequest("request has no 'id'", None)
    if rid is None:
        raise BadRequest(f"'id' must be a string of at most {MAX_ID_BYTES} bytes or an integer", None)
    version = msg.get(Key.V)
    if version is None:
        raise BadRequest("request has no 'v' (protocol version; this supervisor speaks 1)", rid)
    if version != PROTOCOL_VERSION or not _is_int(version):
        raise UnsupportedVersion(
            f"protocol version {_show(version)} is not supported; this supervisor speaks {PROTOCOL_VERSION}", rid
        )
    try:
        op = Op(msg.get(Key.OP))
    except ValueError:
        ops = ", ".join(o.value for o in Op)
        raise BadRequest(f"unknown op {_show(msg.get(Key.OP))}; ops are: {ops}", rid) from None
    unknown = sorted(set(msg) - _ALLOWED_KEYS.get(op, _COMMON))
    if unknown:
        raise BadRequest(f"op '{op.value}' does not take key(s): {', '.join(unknown)}", rid)
    if op is Op.GENERATE:
        return _parse_generate(msg, rid)
    if op is Op.EMBED:
        return _parse_embed(msg, rid)
    if op is Op.CANCEL:
        target = msg.get(Key.TARGET)
        if not _valid_id(target):
            raise BadRequest("cancel needs 'target': the id of one of your generate requests", rid)
        return CancelRequest(rid, op, target=target)
    if op in (Op.LOAD, Op.UNLOAD):
        pin = msg.get(Key.PIN, False)
        if not isinstance(pin, bool):
            raise BadRequest(f"'pin' must be true or false, not {_show(pin)}", rid)
        return ModelRequest(rid, op, model=_model_name(msg, rid, required=True) or "", pin=pin,
                            keep_alive=_keep_alive(msg, rid))
    return Request(rid, op)


def _model_name(msg: Message, rid: str | int, required: bool) -> str | None:
    model = msg.get(Key.MODEL)
    if model is None and not required:
        return None
    if not isinstance(model, str) or not model or len(model) > MAX_ID_BYTES:
        raise BadRequest(f"'model' must be a non-empty string of at most {MAX_ID_BYTES} characters "
                         "(a name from `stoker models`)", rid)
    return model


def _parse_generate(msg: Message, rid: str | int) -> GenerateRequest:
    model = _model_name(msg, rid, required=False)
    prompt, messages = msg.get(Key.PROMPT), msg.get(Key.MESSAGES)
    if (prompt is None) == (messages is None):
        raise BadRequest("generate needs exactly one of 'prompt' (a string) or 'messages' (a list)", rid)
    if prompt is not None and not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string", rid)
    chat: tuple[Mapping[str, str], ...] | None = None
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list of {role, content} maps", rid)
        for i, m in enumerate(messages):
            if (
                not isinstance(m, dict)
                or set(m) != {Key.ROLE, Key.CONTENT}
                or not isinstance(m[Key.ROLE], str)
                or not isinstance(m[Key.CONTENT], str)
            ):
                raise BadRequest(f"messages[{i}] must be a map of exactly 'role' and 'content' strings", rid)
        chat = tuple(dict(m) for m in messages)
    sampling: dict[str, Any] = {}
    for key, (check, wanted) in _SAMPLING_RULES.items():
        if key in msg:
            if not check(msg[key]):
                raise BadRequest(f"'{key}' must be {wanted}, not {_show(msg[key])}", rid)
            sampling[key] = msg[key]
    if Key.RESPONSE_FORMAT in sampling and Key.GRAMMAR in sampling:
        raise BadRequest("give 'response_format' or 'grammar', not both", rid)
    keep_alive, priority, deadline, user = _job_keys(msg, rid)
    resume_text, resume_tokens = _resume(msg.get(Key.RESUME), rid)
    return GenerateRequest(
        rid, Op.GENERATE, model=model, prompt=prompt, messages=chat, sampling=sampling,
        keep_alive=keep_alive, priority=priority, resume_text=resume_text, resume_tokens=resume_tokens,
        deadline=deadline, user=user,
    )


def _job_keys(msg: Message, rid: str | int) -> tuple[float | None, int, float | None, str | None]:
    """keep_alive, priority, deadline and user: what every request that runs on a worker may have."""
    keep_alive = _keep_alive(msg, rid)
    priority = msg.get(Key.PRIORITY, 0)
    if not (_is_int(priority) and -MAX_PRIORITY <= priority <= MAX_PRIORITY):
        raise BadRequest(f"'priority' must be an integer from {-MAX_PRIORITY} to {MAX_PRIORITY} "
                         f"(higher first), not {_show(priority)}", rid)
    deadline = msg.get(Key.DEADLINE)
    if deadline is not None and not (_is_number(deadline) and deadline > 0):
        raise BadRequest(f"'deadline' must be a number of seconds > 0, not {_show(deadline)}", rid)
    user = msg.get(Key.USER)
    if user is not None and not (isinstance(user, str) and user and _valid_id(user)):
        raise BadRequest(f"'user' must be a non-empty string of at most {MAX_ID_BYTES} bytes, not {_show(user)}", rid)
    return keep_alive, priority, float(deadline) if deadline is not None else None, user


def _keep_alive(msg: Message, rid: str | int) -> float | None:
    keep_alive = msg.get(Key.KEEP_ALIVE)
    if keep_alive is not None and not (_is_number(keep_alive) and keep_alive >= 0):
        raise BadRequest(f"'keep_alive' must be a number of seconds >= 0, not {_show(keep_alive)}", rid)
    return None if keep_alive is None else float(keep_alive)


def _parse_embed(msg: Message, rid: str | int) -> EmbedRequest:
    model = _model_name(msg, rid, required=False)
    value = msg.get(Key.INPUT)
    single = isinstance(value, str)
    inputs = [value] if single else value
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= MAX_EMBED_INPUTS:
        got = f"a list of {len(inputs)}" if isinstance(inputs, list) else _show(value)
        raise BadRequest(f"'input' must be a string or a list of 1 to {MAX_EMBED_INPUTS} strings, not {got}", rid)
    for i, text in enumerate(inputs):
        if not isinstance(text, str) or not text:
            where = "'input'" if single else f"input[{i}]"
            raise BadRequest(f"{where} must be a non-empty string, not {_show(text)}", rid)
    flags = {}
    for key, default in ((Key.NORMALIZE, True), (Key.TRUNCATE, False)):
        flags[key] = msg.get(key, default)
        if not isinstance(flags[key], bool):
            raise BadRequest(f"'{key}' must be true or false, not {_show(flags[key])}", rid)
    keep_alive, priority, deadline, user = _job_keys(msg, rid)
    return EmbedRequest(rid, Op.EMBED, model=model, keep_alive=keep_alive, priority=priority, deadline=deadline,
                        user=user,
                        inputs=tuple(inputs), single=single, normalize=flags[Key.NORMALIZE],
                        truncate=flags[Key.TRUNCATE])


def _resume(value: Any, rid: str | int) -> tuple[str, int]:
    """`resume`: {"text": the completion so far, "tokens": how many tokens it was}."""
    if value is None:
        return "", 0
    if (
        not isinstance(value, dict)
        or set(value) != {Key.TEXT, Key.TOKENS}
        or not isinstance(value[Key.TEXT], str)
        or not _is_int(value[Key.TOKENS])
        or not 0 <= value[Key.TOKENS] < 2**32
        or (value[Key.TOKENS] == 0) != (value[Key.TEXT] == "")
    ):
        raise BadRequest("'resume' must be a map of exactly 'text' (the completion so far, a string) and "
                         "'tokens' (how many tokens it was, an integer >= 0; 0 exactly when text is empty)", rid)
    return value[Key.TEXT], value[Key.TOKENS]
