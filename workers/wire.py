"""Messages between the supervisor and its workers: internal, not part of the public protocol
(stoker.protocol); clients never see them, and they may change in any release.

Same framing as the public protocol (one msgpack map per frame) over a DEALER (worker) to
ROUTER (supervisor) pair; `t` names the message kind. Each worker has a second DEALER, with the
routing id `<wid>/hb`, owned by its heartbeat thread: heartbeats flow both ways on it while the
main thread is busy loading a model or generating. What a generation sends back (TOKEN, END,
ERROR) goes over the worker's stream pipe instead (see stoker.workers.stream), in the same messages.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from stoker.protocol.messages import Message

T = "t"
RID = "rid"
PID = "pid"
RSS = "rss"  # hello: the process's resident memory before it loads its model
LOAD_MS = "load_ms"
REQUEST = "request"  # the public generate keys, validated, with max_tokens resolved
START = "start"  # in VECTORS: the index, among the job's inputs, of the first vector
RESUME = "resume"  # in a GENERATE: the completion text the client already has; continue after it
PROGRESS = "p"  # in a worker's heartbeat: a counter its main thread moves (tokens, prompt batches)
HEARTBEAT_SUFFIX = "/hb"  # routing id of a worker's heartbeat socket: wid + this
# A trusted channel: a prompt of up to max_message_bytes plus a resumed completion must fit.
MAX_WORKER_FRAME_BYTES = 64 * 1024 * 1024
# TOKEN, END and ERROR reuse the public names: Key.TEXT, Key.N, Key.REASON, Key.PROMPT_TOKENS,
# Key.COMPLETION_TOKENS, Key.CODE, Key.MESSAGE.


class W(str, Enum):
    """Kinds of message on the worker channel."""

    # worker -> supervisor (TOKEN, END and ERROR on the stream pipe)
    HELLO = "hello"  # pid, rss: the process has started and is loading its model
    READY = "ready"  # load_ms: the model is loaded; the worker takes requests
    LOAD_FAILED = "load_failed"  # message: the model could not be loaded; the worker exits
    TOKEN = "token"  # rid, text, n, and logprobs (an entry per token) if the request asked
    VECTORS = "vectors"  # rid, start, vectors, tokens: an embed job's inputs start.. done
    END = "end"  # rid, reason, prompt_tokens, completion_tokens
    ERROR = "error"  # rid, code, message: this request failed; the worker goes on
    # both ways, on the heartbeat sockets
    HEARTBEAT = "hb"
    # supervisor -> worker
    GENERATE = "generate"  # rid, request (the public generate keys, validated), resume (optional)
    EMBED = "embed"  # rid, request: {input: the inputs still to embed, normalize, truncate}
    CANCEL = "cancel"  # rid
    EXIT = "exit"  # finish nothing further; exit and free the model


def wmsg(kind: W, **keys: Any) -> Message:
    """Build one worker-channel message."""
    return {T: kind.value, **keys}
