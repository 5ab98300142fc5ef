"""The interface every model backend implements, and the factory that picks one by name."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from stoker.protocol.messages import Reason

if TYPE_CHECKING:
    from stoker.supervisor.config import ModelConfig
    from stoker.workers.embeddings import Embedder
    from stoker.workers.engine import Engine


@dataclass(frozen=True)
class Chunk:
    """Text the model produced, and how many tokens it spans."""

    text: str
    n: int = 1
    # With a request's `logprobs`: an entry per token (n of them), see stoker.workers.logprobs.
    logprobs: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """What a worker asks its backend for: exactly one of prompt / messages, plus sampling keys.

    `resume` is completion text already streamed by a worker that died: the backend continues
    after it (the prompt, rendered, plus `resume` is the text to continue), `max_tokens` is what
    is left, and `prompt_tokens` still counts the original prompt alone. max_tokens may be 0
    (the dead worker had streamed everything): then it generates nothing and ends with `length`.
    """

    prompt: str | None
    messages: list[Mapping[str, str]] | None
    max_tokens: int
    sampling: Mapping[str, Any]
    resume: str = ""
    # Called as work advances where no token shows it (each batch of a long prompt), so the
    # supervisor can tell a slow request from a stuck one.
    progress: Callable[[], None] = field(default=lambda: None, compare=False)

    @property
    def seed(self) -> int:
        """The seed; -1 (random) or none gives 0 to deterministic backends."""
        return max(0, int(self.sampling.get("seed", 0)))

    @property
    def stop(self) -> list[str]:
        return list(self.sampling.get("stop", []))


class Generation(abc.ABC):
    """One streaming generation. Iterate for chunks; `reason` and token counts are set by the end."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.reason: Reason | None = None

    @abc.abstractmethod
    def chunks(self) -> Iterator[Chunk]:
        """Yield chunks until the generation ends; set `reason` before returning."""

    def close(self) -> None:
        """Stop early (cancel); releases whatever the backend holds for this generation."""


class Backend(abc.ABC):
    """A loaded model. One per worker process; used from one thread."""

    @abc.abstractmethod
    def load(self) -> None:
        """Load the model into memory. Raises on failure, with a message a person can act on."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> Generation:
        """Start a generation. Raises BadRequest for requests this model cannot serve."""

    def engine(self, parallel: int, progress: Callable[[], None]) -> "Engine":
        """What runs this model's requests, up to `parallel` at once (after `load`). `progress` is
        called as work advances where no token shows it. By default its generations take turns,
        one chunk each: a backend that can batch (run several in one step) has its own."""
        from stoker.workers.engine import GenerationEngine

        return GenerationEngine(self, parallel)


    def embedder(self) -> "Embedder":
        """What runs this model's embed jobs (after `load`; for a model configured to embed)."""
        raise NotImplementedError(f"the {type(self).__name__} cannot embed")


def create_backend(model: "ModelConfig") -> Backend:
    """The backend named by the model's configuration."""
    if model.backend == "fake":
        from stoker.workers.fake_backend import FakeBackend

        return FakeBackend(model)
    if model.backend == "llama":
        from stoker.workers.llama_backend import LlamaBackend

        return LlamaBackend(model)
    raise ValueError(f"unknown backend {model.backend!r} for model '{model.name}'")
