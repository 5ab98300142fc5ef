"""Stop strings over streamed text: what may be sent now, and where the text ends.

Text is pushed a token at a time. A token whose text could be the start of a stop string is
held back until the text that follows shows it is not; on a stop string the text before it is
sent and the rest dropped. Whole tokens only are released, so each chunk says how many tokens it
spans, and `sent_tokens` counts the tokens whose text reached the client (what the usage of a
request that stopped counts).
"""

from __future__ import annotations

from typing import Any

from stoker.workers.backend import Chunk


class StopHolder:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held: list[str] = []  # the texts of whole tokens held back
        self.held_logprobs: list[Any] = []  # their log-probability entries, for a request that wants them
        self.sent_tokens = 0

    def push(self, text: str, logprobs: Any = None) -> tuple[list[Chunk], bool]:
        """A token's text ("" for a token that holds part of a character), and its entry of
        log-probabilities if the request wants them. Returns the chunks that may be sent, and
        whether a stop string was reached (then nothing after it is ever sent)."""
        self.held.append(text)
        if logprobs is not None:
            self.held_logprobs.append(logprobs)
        joined = "".join(self.held)
        hit = min((joined.find(s) for s in self.stops if s in joined), default=-1)
        if hit >= 0:
            # Tokens that carry text before the stop string are sent; the rest are not counted.
            carrying = sum(1 for start in _starts(self.held) if start < hit)
            self.held = []
            self.sent_tokens += carrying
            chunks = [self._chunk(joined[:hit], carrying)] if carrying else []
            self.held_logprobs = []
            return chunks, True
        safe, count, pos = _stop_prefix_start(joined, self.stops), 0, 0
        while count < len(self.held) and pos + len(self.held[count]) <= safe:
            pos += len(self.held[count])
            count += 1
        if not count:
            return [], False
        del self.held[:count]
        self.sent_tokens += count
        return [self._chunk(joined[:pos], count)], False

    def finish(self) -> list[Chunk]:
        """The text ended without a stop string: what was held back goes."""
        held, self.held = self.held, []
        self.sent_tokens += len(held)
        return [self._chunk("".join(held), len(held))] if held else []

    def _chunk(self, text: str, count: int) -> Chunk:
        """The first `count` held tokens as one chunk, with their entries if there are any."""
        if not self.held_logprobs:
            return Chunk(text, count)
        entries, self.held_logprobs = self.held_logprobs[:count], self.held_logprobs[count:]
        return Chunk(text, count, entries)


def _starts(tokens: list[str]) -> list[int]:
    """Offset of each token in their concatenation."""
    offsets, pos = [], 0
    for tok in tokens:
        offsets.append(pos)
        pos += len(tok)
    return offsets


def _stop_prefix_start(text: str, stops: list[str]) -> int:
    """Where the earliest tail of `text` that could begin a stop string starts (len(text) if none)."""
    for start in range(max(0, len(text) - max((len(s) for s in stops), default=0)), len(text)):
        if any(s.startswith(text[start:]) for s in stops):
            return start
    return len(text)
