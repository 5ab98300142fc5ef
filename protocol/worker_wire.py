"""Messages between the supervisor and its workers (internal; never seen by clients).

Same framing as the public protocol (one msgpack map per frame) over a DEALER (worker) to
ROUTER (supervisor) pair; `t` names the message kind.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from stoker.protocol.messages import Message

T = "t"
RID = "rid"
PID = "pid"
LOAD_MS = "load_ms"
REQUEST = "request"  # the public generate keys, validated, with max_tokens resolved
# TOKEN, END and ERROR reuse the public names: Key.TEXT, Key.N, Key.REASON, Key.PROMPT_TOKENS,
# Key.COMPLETION_TOKENS, Key.CODE, Key.MESSAGE.


class W(str, Enum):
    """Kinds of message on the worker channel."""

    # worker -> supervisor
    HELLO = "hello"  # pid: the process has started and is loading its model
    READY = "ready"  # load_ms: the model is loaded; the worker takes requests
    LOAD_FAILED = "load_failed"  # message: the model could not be loaded; the worker exits
    TOKEN = "token"  # rid, text, n
    END = "end"  # rid, reason, prompt_tokens, completion_tokens
    ERROR = "error"  # rid, code, message: this request failed; the worker goes on
    # supervisor -> worker
    GENERATE = "generate"  # rid, request (the public generate keys, validated)
    CANCEL = "cancel"  # rid
    EXIT = "exit"  # finish nothing further; exit and free the model


def wmsg(kind: W, **keys: Any) -> Message:
    """Build one worker-channel message."""
    return {T: kind.value, **keys}
