"""What a worker runs: up to `parallel` generations at once, advanced together a step at a time.

The worker's loop admits requests as the supervisor sends them, cancels them as it asks, and
calls `step()` while any run: each step moves every running generation on (one token each, for
a batched engine one llama_decode for all) and returns what they produced, in order. A request
joins at the next step and leaves at the step that ends it; the others go on.

`GenerationEngine` runs a backend's one-at-a-time `Generation`s, one chunk each per step: with
`parallel = 1` it is exactly the worker of old. Backends that really batch (the fake one, and
llama with `parallel > 1`) have engines of their own.
"""

from __future__ import annotations

import abc
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from stoker.protocol.errors import Internal, StokerError
from stoker.protocol.messages import ErrorCode, Reason
from stoker.workers.backend import Chunk, Generation, GenerationRequest

if TYPE_CHECKING:
    from stoker.workers.backend import Backend


@dataclass(frozen=True)
class Emitted:
    """One thing a step produced for one request: text, its end, or its error."""

    rid: int
    chunk: Chunk | None = None
    reason: Reason | None = None  # set on the request's end
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: tuple[ErrorCode, str] | None = None  # set when it failed (the engine goes on)

    @property
    def final(self) -> bool:
        return self.reason is not None or self.error is not None


def ended(rid: int, reason: Reason, prompt_tokens: int, completion_tokens: int) -> Emitted:
    return Emitted(rid, reason=reason, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


def failed(rid: int, exc: BaseException) -> Emitted:
    """A request's error: a StokerError says what it is; anything else is a bug (logged)."""
    if isinstance(exc, StokerError):
        return Emitted(rid, error=(exc.code, exc.message))
    traceback.print_exception(exc)
    return Emitted(rid, error=(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))


class Engine(abc.ABC):
    """Generations of one loaded model, run together."""

    def __init__(self, parallel: int) -> None:
        self.parallel = parallel

    @property
    @abc.abstractmethod
    def running(self) -> int:
        """How many requests it holds (admitted and not yet ended)."""

    def full(self) -> bool:
        return self.running >= self.parallel

    @abc.abstractmethod
    def admit(self, rid: int, request: GenerationRequest) -> None:
        """Take a request; it starts at the next step. Raises StokerError (bad_request, say) to
        refuse it, having kept nothing."""

    @abc.abstractmethod
    def cancel(self, rid: int) -> None:
        """End it, `cancelled`, at the next reap or step, and free what it holds. Unknown ids: nothing."""

    @abc.abstractmethod
    def step(self) -> list[Emitted]:
        """Move every running request on once; what they produced, ends and errors included."""

    def reap(self) -> list[Emitted]:
        """The ends of requests cancelled since the last step, now, freeing what they hold: the
        worker sends them before the next step, so the supervisor can fill their slots without
        waiting a step more. `step` reaps first too."""
        return []

    def _refuse_when_full(self, rid: int) -> None:
        if self.full():
            raise Internal(f"request {rid} sent to a worker whose {self.parallel} slots are all taken")


class GenerationEngine(Engine):
    """A backend's Generations, one chunk of each per step (round robin)."""

    def __init__(self, backend: "Backend", parallel: int = 1) -> None:
        super().__init__(parallel)
        self.backend = backend
        self._gens: dict[int, tuple[Generation, Iterator[Chunk]]] = {}
        self._cancelled: set[int] = set()

    @property
    def running(self) -> int:
        return len(self._gens)

    def admit(self, rid: int, request: GenerationRequest) -> None:
        self._refuse_when_full(rid)
        gen = self.backend.generate(request)
        self._gens[rid] = (gen, gen.chunks())

    def cancel(self, rid: int) -> None:
        if rid in self._gens:
            self._cancelled.add(rid)

    def reap(self) -> list[Emitted]:
        return [self._finish(rid, Reason.CANCELLED) for rid in list(self._gens) if rid in self._cancelled]

    def step(self) -> list[Emitted]:
        out = self.reap()
        for rid, (gen, chunks) in list(self._gens.items()):
            try:
                out.append(Emitted(rid, chunk=next(chunks)))
            except StopIteration:
                out.append(self._finish(rid, gen.reason or Reason.STOP))
            except Exception as exc:  # this request failed; the worker and the others go on
                self._drop(rid)
                out.append(failed(rid, exc))
        return out

    def _finish(self, rid: int, reason: Reason) -> Emitted:
        gen = self._drop(rid)
        return ended(rid, reason, gen.prompt_tokens, gen.completion_tokens)

    def _drop(self, rid: int) -> Generation:
        gen, _ = self._gens.pop(rid)
        self._cancelled.discard(rid)
        gen.close()  # releases what a generation stopped early holds; nothing for an ended one
        return gen
