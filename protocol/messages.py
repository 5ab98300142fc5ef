"""Names and builders for protocol v1 messages (see protocol/README.md).

Keys, ops, events, reasons and error codes are spelled here and nowhere else.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Mapping

PROTOCOL_VERSION = 1

RequestId = str | int | None
Message = dict[str, Any]


class Op(str, Enum):
    """Request operations a client may ask for."""

    GENERATE = "generate"
    EMBED = "embed"
    CANCEL = "cancel"
    STATUS = "status"
    MODELS = "models"
    LOAD = "load"
    UNLOAD = "unload"
    PING = "ping"
    SHUTDOWN = "shutdown"


class Event(str, Enum):
    """The `ev` of a reply."""

    TOKEN = "token"
    INFO = "info"
    END = "end"
    ERROR = "error"
    RESULT = "result"


TERMINAL_EVENTS = frozenset({Event.END, Event.ERROR, Event.RESULT})


class InfoState(str, Enum):
    """Progress states carried by `info` replies."""

    QUEUED = "queued"
    LOADING = "loading"
    RUNNING = "running"


class Reason(str, Enum):
    """Why a generation ended."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


class ErrorCode(str, Enum):
    """Every error code of protocol v1."""

    BAD_REQUEST = "bad_request"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_MODEL = "unknown_model"
    OVERLOADED = "overloaded"
    INSUFFICIENT_MEMORY = "insufficient_memory"
    LOAD_FAILED = "load_failed"
    WORKER_CRASHED = "worker_crashed"
    SHUTTING_DOWN = "shutting_down"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class Key:
    """Message keys. Attribute names are the Python spelling, values the wire spelling."""

    V = "v"
    OP = "op"
    ID = "id"
    EV = "ev"
    MODEL = "model"
    PROMPT = "prompt"
    MESSAGES = "messages"
    ROLE = "role"
    CONTENT = "content"
    MAX_TOKENS = "max_tokens"
    TEMPERATURE = "temperature"
    TOP_P = "top_p"
    TOP_K = "top_k"
    MIN_P = "min_p"
    REPEAT_PENALTY = "repeat_penalty"
    SEED = "seed"
    STOP = "stop"
    # generate: constrain the text. {"type": "json_object"} or {"type": "json_schema", "schema": {...}};
    # or `grammar`, GBNF text (llama.cpp's grammar format). At most one of the two.
    RESPONSE_FORMAT = "response_format"
    TYPE = "type"
    SCHEMA = "schema"
    GRAMMAR = "grammar"
    # generate: `logprobs: N` puts in each token frame a `logprobs` list, an entry per token:
    # {"token", "bytes", "logprob", "top_logprobs": N x {"token", "bytes", "logprob"}}.
    LOGPROBS = "logprobs"
    TOP_LOGPROBS = "top_logprobs"
    TOKEN = "token"
    BYTES = "bytes"
    LOGPROB = "logprob"
    KEEP_ALIVE = "keep_alive"
    PRIORITY = "priority"
    PIN = "pin"
    TARGET = "target"
    SEQ = "seq"
    N = "n"
    TEXT = "text"
    STATE = "state"
    POSITION = "position"
    REASON = "reason"
    USAGE = "usage"
    PROMPT_TOKENS = "prompt_tokens"
    COMPLETION_TOKENS = "completion_tokens"
    TIMINGS = "timings"
    QUEUED_MS = "queued_ms"
    LOAD_MS = "load_ms"
    TTFT_MS = "ttft_ms"
    TOTAL_MS = "total_ms"
    CODE = "code"
    MESSAGE = "message"
    DATA = "data"
    CANCELLED = "cancelled"
    PONG = "pong"
    VERSION = "version"
    DEFAULT = "default"
    MODELS = "models"
    # Which supervisor process answers (a new one after every start), and which connection of
    # this client it sees: both in `ping` results and in every `info`.
    INSTANCE = "instance"
    SESSION = "session"
    RESUME = "resume"  # generate: {"text", "tokens"}: continue a completion a lost supervisor began
    TOKENS = "tokens"
    DEADLINE = "deadline"  # generate: seconds from acceptance after which it ends with `timeout`
    MAX_MESSAGE_BYTES = "max_message_bytes"  # ping result: the largest request frame read
    # embed: `input` (a string or a list of them), `normalize` (to unit length; default true),
    # `truncate` (cut inputs longer than the model takes instead of refusing them; default false).
    # Its result: {"model", "embeddings": [[float, ...], ...] (one per input, in order), "usage", "timings"}.
    INPUT = "input"
    NORMALIZE = "normalize"
    TRUNCATE = "truncate"
    EMBEDDINGS = "embeddings"
    # generate, embed: who the request is for, when that is not the connection: the fair queue
    # gives turns by it (a gateway that serves many callers over one connection sets it).
    USER = "user"


def _reply(request_id: RequestId, ev: Event, **keys: Any) -> Message:
    return {Key.V: PROTOCOL_VERSION, Key.ID: request_id, Key.EV: ev.value, **keys}


def token(request_id: RequestId, seq: int, n: int, text: str, logprobs: list[Any] | None = None) -> Message:
    """A frame of `n` tokens starting at index `seq` of the completion (with an entry of
    log-probabilities per token, for a request that asked for them)."""
    msg = _reply(request_id, Event.TOKEN, seq=seq, n=n, text=text)
    if logprobs is not None:
        msg[Key.LOGPROBS] = logprobs
    return msg


def info(request_id: RequestId, state: InfoState, position: int | None = None, session: str | None = None,
         instance: str | None = None, model: str | None = None) -> Message:
    """Progress of a request that has not finished, the model it runs on, and which supervisor
    (and connection) has it."""
    msg = _reply(request_id, Event.INFO, state=state.value)
    if position is not None:
        msg[Key.POSITION] = position
    if model is not None:
        msg[Key.MODEL] = model
    if session is not None:
        msg[Key.SESSION] = session
    if instance is not None:
        msg[Key.INSTANCE] = instance
    return msg


def end(
    request_id: RequestId,
    reason: Reason,
    usage: Mapping[str, int],
    timings: Mapping[str, float],
) -> Message:
    """The terminal reply of a generation."""
    return _reply(request_id, Event.END, reason=reason.value, usage=dict(usage), timings=dict(timings))


def error(request_id: RequestId, code: ErrorCode, message: str) -> Message:
    """A terminal error reply."""
    return _reply(request_id, Event.ERROR, code=code.value, message=message)


def result(request_id: RequestId, data: Mapping[str, Any]) -> Message:
    """The terminal reply of a non-generate op."""
    return _reply(request_id, Event.RESULT, data=dict(data))


def request(op: Op, request_id: str | int, **keys: Any) -> Message:
    """A request as a client sends it; keys whose value is None are left out."""
    msg: Message = {Key.V: PROTOCOL_VERSION, Key.OP: op.value, Key.ID: request_id}
    msg.update({k: v for k, v in keys.items() if v is not None})
    return msg


def is_terminal(msg: Mapping[str, Any]) -> bool:
    """Whether a reply ends its request (end, error or result)."""
    return msg.get(Key.EV) in {e.value for e in TERMINAL_EVENTS}
