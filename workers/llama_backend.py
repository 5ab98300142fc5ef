"""The llama-cpp-python backend: a GGUF model in this process's memory (and VRAM if offloaded)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from jinja2 import TemplateError

from stoker.protocol.errors import BadRequest
from stoker.protocol.messages import Key, Reason
from stoker.workers.backend import Backend, Chunk, Generation, GenerationRequest
from stoker.workers.demo_model import ensure_demo_file

if TYPE_CHECKING:
    from llama_cpp import Llama

    from stoker.supervisor.config import ModelConfig

# Protocol sampling keys and the create_completion argument each one becomes.
_SAMPLING_ARGS = {
    Key.TEMPERATURE: "temperature",
    Key.TOP_P: "top_p",
    Key.TOP_K: "top_k",
    Key.MIN_P: "min_p",
    Key.REPEAT_PENALTY: "repeat_penalty",
    Key.SEED: "seed",
    Key.STOP: "stop",
}


def usable_cores() -> int:
    """Cores this process may run on (llama-cpp-python's own default is half of the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class LlamaGeneration(Generation):
    def __init__(self, backend: "LlamaBackend", request: GenerationRequest) -> None:
        super().__init__()
        self._backend = backend
        self._stream: Iterator[dict[str, Any]] | None = None
        llm, name = backend.llm, backend.model.name
        kwargs: dict[str, Any] = {
            arg: request.sampling[key] for key, arg in _SAMPLING_ARGS.items() if key in request.sampling
        }
        if kwargs.get("seed", -1) == -1:
            # Random. Left out, llama-cpp-python would seed from its own fixed seed after each
            # load, so every first request after a load would get the same text.
            kwargs["seed"] = random.getrandbits(32)
        kwargs["max_tokens"] = request.max_tokens
        if request.prompt is not None:
            n_prompt = len(llm.tokenize(request.prompt.encode("utf-8"), add_bos=True, special=True))
            if n_prompt >= llm.n_ctx():
                raise BadRequest(
                    f"the prompt is {n_prompt} tokens but model '{name}' has a context of {llm.n_ctx()} "
                    "tokens (n_ctx); shorten the prompt or raise n_ctx in the model's configuration"
                )
            self.prompt_tokens = n_prompt
            self._stream = llm.create_completion(request.prompt, stream=True, **kwargs)
            self._chat = False
        else:
            try:
                self._stream = llm.create_chat_completion(list(request.messages or []), stream=True, **kwargs)
            except TemplateError as exc:  # e.g. a role the template does not know
                raise BadRequest(f"model '{name}''s chat template rejected these messages: {exc}") from None
            self._chat = True

    def chunks(self) -> Iterator[Chunk]:
        llm = self._backend.llm
        assert self._stream is not None
        try:
            for part in self._stream:
                choice = part["choices"][0]
                text = choice.get("delta", {}).get("content") if self._chat else choice.get("text")
                if choice.get("finish_reason"):
                    self.reason = Reason.LENGTH if choice["finish_reason"] == "length" else Reason.STOP
                if text:
                    if self.completion_tokens == 0 and self._chat:
                        # The first token is sampled but not yet evaluated: n_tokens is the prompt.
                        self.prompt_tokens = llm.n_tokens
                    self.completion_tokens += 1
                    yield Chunk(text)
        except ValueError as exc:
            if "exceed context window" in str(exc):
                raise BadRequest(
                    f"the chat is longer than model '{self._backend.model.name}''s context of "
                    f"{llm.n_ctx()} tokens (n_ctx); send fewer or shorter messages, or raise n_ctx"
                ) from None
            raise
        if self._chat and self.completion_tokens == 0:
            self.prompt_tokens = llm.n_tokens
        if self.reason is None:
            self.reason = Reason.STOP

    def close(self) -> None:
        if self._stream is not None and hasattr(self._stream, "close"):
            self._stream.close()


class LlamaBackend(Backend):
    """Loads `model.path` with llama-cpp-python and streams completions from it."""

    def __init__(self, model: "ModelConfig") -> None:
        self.model = model
        self.llm: "Llama"

    def load(self) -> None:
        from llama_cpp import Llama

        path = ensure_demo_file() if self.model.demo else Path(self.model.path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"model file {path} does not exist (model '{self.model.name}')")
        threads = self.model.n_threads or usable_cores()
        self.llm = Llama(
            model_path=str(path),
            n_ctx=self.model.n_ctx,
            n_gpu_layers=self.model.n_gpu_layers,
            n_threads=threads,
            n_threads_batch=threads,
            chat_format=self.model.chat_format or None,
            verbose=False,
        )

    def generate(self, request: GenerationRequest) -> Generation:
        return LlamaGeneration(self, request)
