"""A model-less backend that behaves like a greedy model, for tests, benchmarks and demos.

Each next token is a pure function of (seed, text so far): a 64-bit FNV-1a hash of the text,
folded in as tokens are appended. So the same request always gives the same text, and a request
resumed from "prompt + completion so far" continues exactly where the first one was.
"""

from __future__ import annotations

import mmap
import os
import signal
import time
from typing import TYPE_CHECKING, Iterator

from stoker.protocol.messages import Reason
from stoker.workers.backend import Backend, Chunk, Generation, GenerationRequest

if TYPE_CHECKING:
    from stoker.supervisor.config import ModelConfig

WORDS = (
    " the", " a", " stoker", " keeps", " models", " warm", " and", " never", " loses", " requests",
    " fire", " coal", " engine", " steam", " boiler", " pressure", " gauge", " valve", " shovel",
    " furnace", " heat", " track", " train", " station", " signal", " whistle", " night", " day",
    " runs", " turns", " burns", " glows", " is", " was", " will", " be", " on", " at", " in", " of",
    " to", " with", " for", " every", " one", " two", " three", " slowly", " quickly", " again",
    ",", ".", ";", " red", " black", " iron", " brass", " wheel", " smoke", " line", " rail",
    " crew", " driver", " load",
)
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK = 0xFFFFFFFFFFFFFFFF
# By default about one token in END_EVERY ends the text naturally (0: it never ends by itself).
END_EVERY = 97


def fold(state: int, text: str) -> int:
    """FNV-1a over the UTF-8 bytes of `text`, continuing from `state`."""
    for byte in text.encode("utf-8"):
        state = ((state ^ byte) * _FNV_PRIME) & _MASK
    return state


def initial_state(seed: int) -> int:
    return ((_FNV_OFFSET ^ seed) * _FNV_PRIME) & _MASK


def _mix(state: int) -> int:
    """splitmix64's finalizer: FNV's low bits depend only on low bits, so spread every bit first."""
    state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK
    return state ^ (state >> 31)


def next_token(state: int, end_every: int = END_EVERY) -> str | None:
    """The token that follows a text whose hash is `state`; None is the natural end."""
    mixed = _mix(state)
    if end_every and (mixed >> 32) % end_every == 0:
        return None
    return WORDS[mixed % len(WORDS)]


def render_chat(messages: list) -> str:
    """The fake model's chat template."""
    return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"


def complete(text: str, seed: int, max_tokens: int, end_every: int = END_EVERY) -> tuple[list[str], Reason]:
    """The whole greedy completion of `text`, without pacing: what a generation streams."""
    state, tokens = fold(initial_state(seed), text), []
    while len(tokens) < max_tokens:
        tok = next_token(state, end_every)
        if tok is None:
            return tokens, Reason.STOP
        tokens.append(tok)
        state = fold(state, tok)
    return tokens, Reason.LENGTH


class FakeGeneration(Generation):
    def __init__(self, backend: "FakeBackend", request: GenerationRequest) -> None:
        super().__init__()
        self._backend = backend
        self._request = request
        prompt = request.prompt if request.prompt is not None else render_chat(request.messages or [])
        self.prompt_tokens = max(1, len(prompt.split()))
        self._text = prompt + request.resume

    def chunks(self) -> Iterator[Chunk]:
        req, tps = self._request, self._backend.tokens_per_second
        state = fold(initial_state(req.seed), self._text)
        held: list[str] = []  # whole tokens held back while they may begin a stop string
        next_at = time.monotonic()
        while self.completion_tokens < req.max_tokens:
            tok = next_token(state, self._backend.model.end_every)
            if tok is None:
                break
            if tps > 0:
                next_at += 1.0 / tps
                time.sleep(max(0.0, next_at - time.monotonic()))
            if self._backend.model.stall_after and self.completion_tokens == self._backend.model.stall_after:
                # Fault injection: hang as a native call stuck with the GIL released would (its
                # heartbeat thread goes on beating).
                time.sleep(24 * 3600)
            state = fold(state, tok)
            self.completion_tokens += 1
            held.append(tok)
            joined = "".join(held)
            hit = min((joined.find(s) for s in req.stop if s in joined), default=-1)
            if hit >= 0:
                # Tokens that carry text before the stop string are sent; the rest are not
                # counted, so completion_tokens stays the sum of the frames' n.
                carrying = sum(1 for start in _starts(held) if start < hit)
                self.completion_tokens -= len(held) - carrying
                if carrying:
                    yield Chunk(joined[:hit], carrying)
                self.reason = Reason.STOP
                return
            safe, count, pos = _stop_prefix_start(joined, req.stop), 0, 0
            while count < len(held) and pos + len(held[count]) <= safe:
                pos += len(held[count])
                count += 1
            if count:
                yield Chunk(joined[:pos], count)
                del held[:count]
        if held:
            yield Chunk("".join(held), len(held))
        self.reason = Reason.LENGTH if self.completion_tokens >= req.max_tokens else Reason.STOP


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


def hold_memory(size: int) -> bytearray:
    """`size` bytes that really are resident, as a model's weights would be: a fresh allocation
    maps the zero page, so one byte of every page is written."""
    buf = bytearray(size)
    page = mmap.PAGESIZE
    buf[::page] = b"\x01" * len(range(0, size, page))
    return buf


class FakeBackend(Backend):
    """Streams `complete()` at `tokens_per_second` after sleeping `load_seconds` and allocating
    `memory_bytes`."""

    def __init__(self, model: "ModelConfig") -> None:
        self.model = model
        self.tokens_per_second = model.tokens_per_second
        self.weights = bytearray()

    def load(self) -> None:
        if self.model.ignore_sigterm:  # fault injection: a worker deaf to SIGTERM (stuck in a driver, say)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(self.model.load_seconds)
        # Like a real model, one with a path needs its file (its content does not matter).
        if self.model.path and not os.path.isfile(self.model.path):
            raise FileNotFoundError(f"model file {self.model.path} does not exist (model '{self.model.name}')")
        # Fault injection for tests of the supervisor's load-failure handling.
        if self.model.fail_load == "crash":
            print(f"fake model '{self.model.name}': crashing at load as configured", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.model.fail_load:
            raise RuntimeError(self.model.fail_load)
        # What it claims (memory_bytes), or, to test budgets against a wrong claim, allocate_bytes.
        self.weights = hold_memory(self.model.allocate_bytes or self.model.memory_bytes)

    def generate(self, request: GenerationRequest) -> Generation:
        return FakeGeneration(self, request)
