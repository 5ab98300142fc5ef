"""The llama-cpp-python backend: a GGUF model in this process's memory (and VRAM if offloaded)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from jinja2 import TemplateError

from stoker.protocol.errors import BadRequest
from stoker.protocol.messages import Key, Reason
from stoker.supervisor.resources import usable_cores
from stoker.workers.backend import Backend, Chunk, Generation, GenerationRequest
from stoker.workers.demo_model import ensure_demo_file

if TYPE_CHECKING:
    from llama_cpp import Llama

    from stoker.supervisor.config import ModelConfig

# llama-cpp-python's default temperature for chat completions (plain completions default to 0.8).
_CHAT_TEMPERATURE = 0.2
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


class LlamaGeneration(Generation):
    """Every request, chat or not, runs as a completion of a token list that stoker builds: the
    rendered prompt, plus the completion a dead worker already streamed when resuming. So a
    resumed request continues the very text it would have, and greedy sampling gives the same
    completion (up to how the streamed text re-tokenizes)."""

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
        if request.prompt is not None:
            prompt, add_bos = request.prompt, True
        else:
            kwargs.setdefault("temperature", _CHAT_TEMPERATURE)
            rendered = backend.render_chat(list(request.messages or []))
            prompt, add_bos = rendered.prompt, not rendered.added_special
            if rendered.stop:
                extra = [rendered.stop] if isinstance(rendered.stop, str) else list(rendered.stop)
                kwargs["stop"] = list(kwargs.get("stop", [])) + extra
            if rendered.stopping_criteria is not None:
                kwargs["stopping_criteria"] = rendered.stopping_criteria

        def tokens(text: str) -> list[int]:
            return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

        prompt_ids = tokens(prompt)
        self.prompt_tokens = len(prompt_ids)
        ids = tokens(prompt + request.resume) if request.resume else prompt_ids
        if request.resume and len(ids) >= llm.n_ctx():  # the first run stopped at the context's end
            self.reason = Reason.LENGTH
            return
        if len(ids) >= llm.n_ctx():
            what = "prompt" if request.prompt is not None else "chat"
            raise BadRequest(
                f"the {what} is {len(ids)} tokens but model '{name}' has a context of {llm.n_ctx()} "
                f"tokens (n_ctx); shorten the {what} or raise n_ctx in the model's configuration"
            )
        if request.max_tokens <= 0:  # llama-cpp-python reads 0 as "up to the context's end"
            self.reason = Reason.LENGTH
            return
        if request.resume and ids[: len(prompt_ids)] == prompt_ids:
            # Rebuild the KV cache the way the first run built it: the prompt in batches, then
            # each streamed token on its own. Evaluated in one batch instead, the same tokens give
            # slightly different logits, and greedy sampling can pick another token where two are
            # close. create_completion then reuses this cache (all but the last token).
            llm.reset()
            llm.eval(prompt_ids)
            for token in ids[len(prompt_ids):]:
                llm.eval([token])
        self._stream = llm.create_completion(ids, stream=True, max_tokens=request.max_tokens, **kwargs)

    def chunks(self) -> Iterator[Chunk]:
        if self._stream is None:
            return
        for part in self._stream:
            choice = part["choices"][0]
            if choice.get("finish_reason"):
                self.reason = Reason.LENGTH if choice["finish_reason"] == "length" else Reason.STOP
            if choice.get("text"):
                self.completion_tokens += 1
                yield Chunk(choice["text"])
        if self.reason is None:
            self.reason = Reason.STOP

    def close(self) -> None:
        if self._stream is not None and hasattr(self._stream, "close"):
            self._stream.close()


def _chat_formatter(llm: "Llama") -> Any:
    """The function that renders a chat into a prompt for this model, as llama-cpp-python's own
    chat completion would (its `chat_format` after load: the configured one, else the GGUF's
    template, else a guess). None if that is a custom handler with no template, or unknown."""
    from llama_cpp import llama_chat_format

    name = llm.chat_format or "llama-2"
    handler = llm._chat_handlers.get(name)  # "chat_template.*": the GGUF's own templates
    if handler is None:
        try:
            handler = llama_chat_format.get_chat_completion_handler(name)
        except llama_chat_format.LlamaChatCompletionHandlerNotFoundException:
            # Not a registered name: chat requests get a clear error; prompts still work.
            return None
    # Handlers made from a formatter keep it in their closure as `chat_formatter`.
    names = getattr(getattr(handler, "__code__", None), "co_freevars", ())
    if "chat_formatter" in names and handler.__closure__:
        return handler.__closure__[names.index("chat_formatter")].cell_contents
    return None


class LlamaBackend(Backend):
    """Loads `model.path` with llama-cpp-python and streams completions from it."""

    def __init__(self, model: "ModelConfig") -> None:
        import llama_cpp  # noqa: F401  (imported here, before the worker says hello: see Worker.run)

        self.model = model
        self.llm: "Llama"
        self._formatter: Any = None

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
        self._formatter = _chat_formatter(self.llm)

    def render_chat(self, messages: list[Any]) -> Any:
        """The chat rendered by the model's template: a ChatFormatterResponse (prompt, stop, ...)."""
        if self._formatter is None:
            raise BadRequest(f"model '{self.model.name}''s chat_format {self.model.chat_format!r} has no template "
                             "stoker can render; send a prompt instead, or pick a template chat_format")
        try:
            return self._formatter(messages=messages)
        except (TemplateError, ValueError) as exc:  # an unknown role; a template's raise_exception
            raise BadRequest(f"model '{self.model.name}''s chat template rejected these messages: {exc}") from None

    def generate(self, request: GenerationRequest) -> Generation:
        return LlamaGeneration(self, request)
