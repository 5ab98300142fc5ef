"""Per-client reply buffers, so a slow client never blocks the loop and never loses a token.

The frontend ROUTER has ROUTER_MANDATORY set: a send to a client whose pipe is full fails with
EAGAIN instead of being silently dropped. Replies that cannot go out yet wait here, and while
they wait, consecutive token frames of one request merge into one frame (`n` > 1), so a stalled
client costs one growing string per request rather than a frame per token. Other replies wait
already encoded (a frame costs its bytes, not a dict's worth of objects), and the whole is
counted, so a client that sends and never reads can be held to a bound (see Frontend).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from stoker.protocol.codec import encode
from stoker.protocol.messages import Event, Key, Message, is_terminal

ClientId = bytes
Frame = bytes | Message  # an encoded reply, or an open token frame still taking tokens
_TOKEN_FRAME_BYTES = 64  # what an open token frame costs besides its text (its keys, encoded)


class Outbox:
    """Replies waiting for one client, oldest first, and what they take up (`size`, bytes)."""

    def __init__(self) -> None:
        self.pending: deque[Frame] = deque()
        # request id -> its token frame still waiting in `pending` (the one new tokens merge into)
        self._open_tokens: dict[Any, Message] = {}
        self.size = 0

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, msg: Message) -> None:
        rid = msg.get(Key.ID)
        if msg[Key.EV] == Event.TOKEN.value:
            waiting = self._open_tokens.get(rid)
            if waiting is not None:
                waiting[Key.N] += msg[Key.N]
                waiting[Key.TEXT] += msg[Key.TEXT]
                self.size += len(msg[Key.TEXT]) + _logprobs_bytes(msg)
                if Key.LOGPROBS in msg:
                    waiting.setdefault(Key.LOGPROBS, []).extend(msg[Key.LOGPROBS])
                return
            msg = dict(msg)
            if Key.LOGPROBS in msg:
                msg[Key.LOGPROBS] = list(msg[Key.LOGPROBS])  # grown in place as tokens merge in
            self._open_tokens[rid] = msg
            self.pending.append(msg)
            self.size += _open_bytes(msg)
            return
        if is_terminal(msg):
            # Later tokens of this id are impossible; nothing may merge past its terminal reply.
            self._open_tokens.pop(rid, None)
        frame = encode(msg)
        self.pending.append(frame)
        self.size += len(frame)

    def flush(self, send: Callable[[bytes], bool]) -> bool:
        """Send what the client's pipe takes; True once everything is out. `send` takes an
        encoded frame and returns False when the pipe is full."""
        while self.pending:
            item = self.pending[0]
            frame = item if isinstance(item, bytes) else encode(item)
            if not send(frame):
                return False
            self.pending.popleft()
            if isinstance(item, bytes):
                self.size -= len(item)
            else:
                self.size -= _open_bytes(item)
                if self._open_tokens.get(item.get(Key.ID)) is item:
                    del self._open_tokens[item.get(Key.ID)]
        return True


def _logprobs_bytes(msg: Message) -> int:
    """What a token frame's log-probability entries take, roughly (msgpack of their keys and
    numbers): counted without encoding them."""
    return sum(40 + 2 * len(e.get(Key.BYTES, ())) + 50 * len(e.get(Key.TOP_LOGPROBS, ()))
               for e in msg.get(Key.LOGPROBS, ()))


def _open_bytes(msg: Message) -> int:
    """What an open token frame is counted as, from what it holds now (the same when it goes)."""
    return len(msg[Key.TEXT]) + _TOKEN_FRAME_BYTES + _logprobs_bytes(msg)
