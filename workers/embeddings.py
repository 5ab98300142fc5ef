"""Embeddings in the worker: the inputs of `embed` jobs, evaluated together in batches.

The worker admits an embed job as the supervisor sends it (its inputs checked and tokenized
first: one too long is refused, or cut with `truncate`, before anything runs) and calls `step()`
between generation steps while any job runs. A step evaluates one batch: as many inputs as fit
(`capacity` tokens, `max_inputs` sequences), taken from the jobs in the order they came, so a job
of 256 short strings costs a few model calls, not 256, and a generation running beside it waits
one batch at most. Each step sends the vectors it made at once (the supervisor keeps them, so a
job whose worker dies is resumed with its remaining inputs only), then the job's end.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from stoker.protocol.errors import BadRequest
from stoker.protocol.messages import Reason
from stoker.workers.engine import Emitted, ended

if TYPE_CHECKING:
    from stoker.supervisor.config import ModelConfig

MAX_INPUTS_PER_BATCH = 64


@dataclass(frozen=True)
class Vectors:
    """Vectors a step made for one job: for its inputs `start` .. start + len(vectors) - 1."""

    rid: int
    start: int
    vectors: list[list[float]]
    tokens: int  # the tokens of those inputs
    chunk: None = None  # (what the worker's stream asks of everything it sends)

    @property
    def final(self) -> bool:
        return False


@dataclass
class EmbedJob:
    rid: int
    items: list[Any]  # its inputs, as the backend evaluates them (token lists, or texts)
    costs: list[int]  # the tokens of each
    normalize: bool
    done: int = 0  # inputs evaluated and sent
    tokens: int = 0
    cancelled: bool = False


class Embedder(abc.ABC):
    """The embed jobs of one worker, a batch of inputs per step."""

    def __init__(self, capacity: int, max_inputs: int = MAX_INPUTS_PER_BATCH) -> None:
        self.capacity = capacity  # tokens one batch evaluates at most (and the longest input)
        self.max_inputs = max_inputs
        self.jobs: dict[int, EmbedJob] = {}

    @property
    def running(self) -> int:
        return len(self.jobs)

    def admit(self, rid: int, texts: list[str], normalize: bool, truncate: bool) -> None:
        """Take a job; raises BadRequest (an input too long, say) having kept nothing."""
        items, costs = [], []
        for i, text in enumerate(texts):
            item, cost = self.prepare(text)
            if cost > self.capacity:
                if not truncate:
                    raise BadRequest(
                        f"input[{i}] is {cost} tokens, and model '{self.model_name}' embeds at most {self.capacity} "
                        "tokens per input (its embedding_ctx); shorten it, or send truncate = true to cut it")
                item, cost = self.cut(item, self.capacity), self.capacity
            items.append(item)
            costs.append(max(1, cost))
        self.jobs[rid] = EmbedJob(rid, items, costs, normalize)

    def cancel(self, rid: int) -> None:
        job = self.jobs.get(rid)
        if job is not None:
            job.cancelled = True

    def cancel_all(self) -> None:
        for job in self.jobs.values():
            job.cancelled = True

    def step(self) -> list[Emitted | Vectors]:
        out: list[Emitted | Vectors] = []
        for job in [j for j in self.jobs.values() if j.cancelled]:
            del self.jobs[job.rid]
            out.append(ended(job.rid, Reason.CANCELLED, job.tokens, 0))
        for job in [j for j in self.jobs.values() if not j.items]:  # nothing left to do (all done before a crash)
            del self.jobs[job.rid]
            out.append(ended(job.rid, Reason.STOP, 0, 0))
        picked: list[tuple[EmbedJob, int]] = []
        tokens = 0
        for job in self.jobs.values():
            for i in range(job.done, len(job.items)):
                if len(picked) >= self.max_inputs or tokens + job.costs[i] > self.capacity:
                    break
                picked.append((job, i))
                tokens += job.costs[i]
            else:
                continue
            break
        if not picked:
            return out
        vectors = self.evaluate([job.items[i] for job, i in picked])
        for job in {job.rid: job for job, _ in picked}.values():
            mine = [(i, v) for (j, i), v in zip(picked, vectors) if j is job]
            rows = [_unit(v) if job.normalize else v for _, v in mine]
            cost = sum(job.costs[i] for i, _ in mine)
            out.append(Vectors(job.rid, mine[0][0], [np.asarray(r, dtype=np.float32).tolist() for r in rows], cost))
            job.done += len(mine)
            job.tokens += cost
            if job.done == len(job.items):
                del self.jobs[job.rid]
                out.append(ended(job.rid, Reason.STOP, job.tokens, 0))
        return out

    model_name: str = ""

    @abc.abstractmethod
    def prepare(self, text: str) -> tuple[Any, int]:
        """An input as the backend evaluates it, and its length in tokens."""

    @abc.abstractmethod
    def cut(self, item: Any, tokens: int) -> Any:
        """The first `tokens` tokens of an input."""

    @abc.abstractmethod
    def evaluate(self, items: list[Any]) -> list[np.ndarray]:
        """One vector per input (not normalized), in one batch."""


def _unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


class FakeEmbedder(Embedder):
    """Deterministic vectors for tests: each word of the text adds +1 or -1 at a place its hash
    picks (so texts that share words point the same way), paced at the model's
    tokens_per_second (a word is a token)."""

    def __init__(self, model: "ModelConfig") -> None:
        super().__init__(model.embedding_ctx)
        self.model_name = model.name
        self.dim = model.embedding_dim
        self.tokens_per_second = model.tokens_per_second

    def prepare(self, text: str) -> tuple[Any, int]:
        words = text.lower().split() or [text]
        return words, len(words)

    def cut(self, item: Any, tokens: int) -> Any:
        return item[:tokens]

    def evaluate(self, items: list[Any]) -> list[np.ndarray]:
        from stoker.workers.fake_backend import fold, initial_state

        if self.tokens_per_second > 0:
            import time

            time.sleep(sum(len(words) for words in items) / self.tokens_per_second)
        out = []
        for words in items:
            v = np.zeros(self.dim, dtype=np.float32)
            for word in words:
                h = fold(initial_state(0), word.strip(".,;:!?\"'"))
                v[h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
            out.append(v)
        return out
