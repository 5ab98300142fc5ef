"""A model-less backend that behaves like a greedy model, for tests, benchmarks and demos.

Each next token is a pure function of (seed, text so far): a 64-bit FNV-1a hash of the text,
folded in as tokens are appended. So the same request always gives the same text, and a request
resumed from "prompt + completion so far" continues exactly where the first one was.
"""

from __future__ import annotations

import math
import mmap
import os
import signal
import time
from typing import TYPE_CHECKING, Callable, Iterator

from stoker.protocol.errors import BadRequest
from stoker.protocol.messages import Key, Reason
from stoker.workers.backend import Backend, Chunk, Generation, GenerationRequest
from stoker.workers import fake_json, logprobs
from stoker.workers.embeddings import FakeEmbedder
from stoker.workers.engine import Emitted, Engine, ended
from stoker.workers.stops import StopHolder

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


def logprob_entry(state: int, token: str, n: int) -> dict:
    """The fake model's log-probabilities at a text whose hash is `state`, for the token it
    chose: a pure function of both, like the text. The chosen token is the most likely (it is
    greedy): probability 0.34 to 0.99; the next WORDS after it share what is left, halving (so
    the first of them has at most 0.33)."""
    mixed = _mix(state ^ 0x5BD1E995)
    p = 0.34 + 0.65 * ((mixed >> 16) % 1000) / 999
    start = WORDS.index(token) if token in WORDS else -1
    alternatives, rest = [], 1.0 - p
    for i in range(1, n):
        rest /= 2
        alternatives.append((WORDS[(start + i) % len(WORDS)], rest))
    chosen = logprobs.alt(token.encode(), math.log(p))
    top = ([chosen] if n else []) + [logprobs.alt(w.encode(), math.log(q)) for w, q in alternatives]
    return logprobs.entry(token.encode(), math.log(p), top)


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


class FakeSequence:
    """One request's text, a token at a time: what a step of the fake model does for it. Holds
    back whole tokens while they may begin a stop string; the text does not depend on what else
    runs in the same step."""

    def __init__(self, model: "ModelConfig", request: GenerationRequest) -> None:
        self.model = model
        self.request = request
        prompt = request.prompt if request.prompt is not None else render_chat(request.messages or [])
        self.prompt_tokens = max(1, len(prompt.split()))
        self.completion_tokens = 0
        prompted = fold(initial_state(request.seed), prompt)
        self.state = fold(prompted, request.resume)
        self.stops = StopHolder(request.stop)
        self.reason: Reason | None = Reason.LENGTH if request.max_tokens <= 0 else None
        self.script = self._constrained(request, prompted)
        self.logprobs = logprobs.wanted(request.sampling)

    @staticmethod
    def _constrained(request: GenerationRequest, prompted: int) -> Iterator[str] | None:
        """The tokens still to come of a constrained request's JSON document (None: free text)."""
        sampling = request.sampling
        if Key.GRAMMAR in sampling:
            raise BadRequest("the fake backend cannot follow a GBNF grammar; use 'response_format', "
                             "or a llama model")
        if Key.RESPONSE_FORMAT not in sampling:
            return None
        doc = fake_json.document(sampling[Key.RESPONSE_FORMAT], prompted)
        if not doc.startswith(request.resume):
            raise BadRequest("'resume' text is not the start of this request's document; "
                             "it cannot be continued")
        return iter(fake_json.pieces(doc[len(request.resume):]))

    @property
    def done(self) -> bool:
        return self.reason is not None

    def advance(self) -> list[Chunk]:
        """Produce one token (or the natural end); the text it lets go of."""
        if self.script is not None:
            tok = next(self.script, None)
        else:
            tok = next_token(self.state, self.model.end_every)
        if tok is None:
            return self._end(Reason.STOP)
        if self.model.stall_after and self.completion_tokens == self.model.stall_after:
            # Fault injection: hang as a native call stuck with the GIL released would (its
            # heartbeat thread goes on beating).
            time.sleep(24 * 3600)
        entry = None if self.logprobs is None else logprob_entry(self.state, tok, self.logprobs)
        self.state = fold(self.state, tok)
        self.completion_tokens += 1
        out, hit = self.stops.push(tok, entry)
        if hit:
            self.completion_tokens = self.stops.sent_tokens  # the stop's own tokens are not counted
            self.reason = Reason.STOP
            return out
        if self.completion_tokens >= self.request.max_tokens:
            out += self._end(Reason.LENGTH)
        return out

    def _end(self, reason: Reason) -> list[Chunk]:
        self.reason = reason
        return self.stops.finish()


class FakeGeneration(Generation):
    """One request on its own, paced at the model's tokens_per_second."""

    def __init__(self, backend: "FakeBackend", request: GenerationRequest) -> None:
        super().__init__()
        self._backend = backend
        self._seq = FakeSequence(backend.model, request)
        self.prompt_tokens = self._seq.prompt_tokens

    def chunks(self) -> Iterator[Chunk]:
        seq, tps = self._seq, self._backend.tokens_per_second
        next_at = time.monotonic()
        while not seq.done:
            if tps > 0:
                next_at += 1.0 / tps
                time.sleep(max(0.0, next_at - time.monotonic()))
            yield from seq.advance()
            self.completion_tokens = seq.completion_tokens
        self.reason = seq.reason


class FakeEngine(Engine):
    """Up to `parallel` fake sequences, one token each per step. A step of n sequences takes
    (1 + batch_cost * (n - 1)) / tokens_per_second, as a real model's step grows with its batch
    (no sleeping when tokens_per_second is 0)."""

    def __init__(self, model: "ModelConfig", parallel: int) -> None:
        super().__init__(parallel)
        self.model = model
        self._seqs: dict[int, FakeSequence] = {}
        self._cancelled: set[int] = set()
        self._next_at = 0.0  # when the running step is due to end

    @property
    def running(self) -> int:
        return len(self._seqs)

    def admit(self, rid: int, request: GenerationRequest) -> None:
        self._refuse_when_full(rid)
        if not self._seqs:
            self._next_at = time.monotonic()  # idle until now: the first step starts now
        self._seqs[rid] = FakeSequence(self.model, request)

    def cancel(self, rid: int) -> None:
        if rid in self._seqs:
            self._cancelled.add(rid)

    def reap(self) -> list[Emitted]:
        out = []
        for rid in [r for r in self._seqs if r in self._cancelled]:
            self._seqs[rid].completion_tokens = self._seqs[rid].stops.sent_tokens  # held back: never sent
            out.append(self._finish(rid, Reason.CANCELLED))
        return out

    def step(self) -> list[Emitted]:
        out = self.reap()
        generating = [rid for rid, seq in self._seqs.items() if not seq.done]
        tps = self.model.tokens_per_second
        if generating and tps > 0:
            self._next_at += (1 + self.model.batch_cost * (len(generating) - 1)) / tps
            time.sleep(max(0.0, self._next_at - time.monotonic()))
        for rid, seq in list(self._seqs.items()):
            if not seq.done:
                out += [Emitted(rid, chunk=c) for c in seq.advance()]
            if seq.done:
                out.append(self._finish(rid, seq.reason or Reason.STOP))
        return out

    def _finish(self, rid: int, reason: Reason) -> Emitted:
        seq = self._seqs.pop(rid)
        self._cancelled.discard(rid)
        return ended(rid, reason, seq.prompt_tokens, seq.completion_tokens)


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

    def engine(self, parallel: int, progress: Callable[[], None]) -> Engine:
        return FakeEngine(self.model, parallel)

    def embedder(self) -> FakeEmbedder:
        return FakeEmbedder(self.model)
