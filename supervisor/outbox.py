"""Per-client reply buffers, so a slow client never blocks the loop and never loses a token.

The frontend ROUTER has ROUTER_MANDATORY set: a send to a client whose pipe is full fails with
EAGAIN instead of being silently dropped. Replies that cannot go out yet wait here, and while
they wait, consecutive token frames of one request merge into one frame (`n` > 1), so a stalled
client costs one growing string per request rather than a frame per token.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from stoker.protocol.messages import Event, Key, Message, is_terminal

ClientId = bytes


class Outbox:
    """Replies waiting for one client, oldest first."""

    def __init__(self) -> None:
        self.pending: deque[Message] = deque()
        # request id -> its token frame still waiting in `pending` (the one new tokens merge into)
        self._open_tokens: dict[Any, Message] = {}

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, msg: Message) -> None:
        rid = msg.get(Key.ID)
        if msg[Key.EV] == Event.TOKEN.value:
            waiting = self._open_tokens.get(rid)
            if waiting is not None:
                waiting[Key.N] += msg[Key.N]
                waiting[Key.TEXT] += msg[Key.TEXT]
                return
            msg = dict(msg)
            self._open_tokens[rid] = msg
        elif is_terminal(msg):
            # Later tokens of this id are impossible; nothing may merge past its terminal reply.
            self._open_tokens.pop(rid, None)
        self.pending.append(msg)

    def flush(self, send: Callable[[Message], bool]) -> bool:
        """Send what the client's pipe takes; True once everything is out. `send` returns False
        when the pipe is full."""
        while self.pending:
            msg = self.pending[0]
            if not send(msg):
                return False
            self.pending.popleft()
            if self._open_tokens.get(msg.get(Key.ID)) is msg:
                del self._open_tokens[msg.get(Key.ID)]
        return True
