"""Which token prefixes a batched llama context keeps after their requests end, and which one a
new request can start from. Bookkeeping only: the engine moves the KV cells.

Sharing: a new request whose tokens begin with what a running request has (or is about to
have) in the KV cache, or with a cache entry, starts from those cells instead of computing them
again (with a unified KV cache, llama_memory_seq_cp shares cells, it does not copy them). At
least its last prompt token is always computed anew, for its logits.

What is cached (the model's `prefix_cache`, in tokens; 0 by default): the tokens a finished (or
cancelled) request had in the KV cache, its prompt and what it generated, under a sequence id
of its own (ids `parallel` and up), as long as it is at least MIN_SHARE tokens.

When it is evicted: the entries hold at most `budget` tokens together (the cells they may hold
on their own; cells shared with others are counted as if they were not), least recently used
first out; an entry that another one extends is dropped for it; the whole cache goes with its
worker. The engine sizes its context for its sequences plus this budget, so the cache never
takes cells a running request needs. Kept cells cost time: llama.cpp attends over every used
cell of a unified cache at every step (docs/performance.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count

MIN_SHARE = 16  # tokens: shorter common prefixes are computed anew (not worth the bookkeeping)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class Entry:
    seq_id: int
    tokens: list[int]
    used: int = 0  # when it was last used: higher is more recent


@dataclass
class PrefixCache:
    budget: int  # tokens all entries may hold together; 0: nothing is cached
    first_id: int  # the sequence ids entries use: first_id .. first_id + slots - 1
    slots: int
    entries: dict[int, Entry] = field(default_factory=dict)  # by sequence id
    _clock: count = field(default_factory=count)

    def best(self, tokens: list[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with `tokens` (at least MIN_SHARE), and its length."""
        best, length = None, 0
        for entry in self.entries.values():
            n = common_prefix(entry.tokens, tokens)
            if n > length:
                best, length = entry, n
        if best is None or length < MIN_SHARE:
            return None, 0
        best.used = next(self._clock)
        return best, length

    def admit(self, tokens: list[int]) -> tuple[int | None, list[int]]:
        """Where to keep a finished request's tokens: a free sequence id, and the entries to drop
        first (their cells to free: least recently used, or extended by this one). None: not
        cached (too short, or longer than the whole budget)."""
        if len(tokens) < MIN_SHARE or len(tokens) > self.budget:
            return None, []
        drop = [e.seq_id for e in self.entries.values() if common_prefix(e.tokens, tokens) == len(e.tokens)]
        kept = sorted((e for e in self.entries.values() if e.seq_id not in drop), key=lambda e: e.used)
        held = sum(len(e.tokens) for e in kept)
        while kept and (held + len(tokens) > self.budget or len(kept) >= self.slots):
            oldest = kept.pop(0)
            drop.append(oldest.seq_id)
            held -= len(oldest.tokens)
        for seq_id in drop:
            del self.entries[seq_id]
        seq_id = next(i for i in range(self.first_id, self.first_id + self.slots) if i not in self.entries)
        self.entries[seq_id] = Entry(seq_id, list(tokens), next(self._clock))
        return seq_id, drop

    @property
    def tokens(self) -> int:
        return sum(len(e.tokens) for e in self.entries.values())
