"""The llama-cpp-python backend: a GGUF model in this process's memory (and VRAM if offloaded)."""

from __future__ import annotations

import random
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
from jinja2 import TemplateError

from stoker.protocol.errors import BadRequest
from stoker.protocol.messages import Key, Reason
from stoker.supervisor.resources import usable_cores
from stoker.workers.backend import Backend, Chunk, Generation, GenerationRequest
from stoker.workers import logprobs
from stoker.workers.engine import Engine
from stoker.workers.grammars import Grammars
from stoker.workers.demo_model import ensure_demo_file

if TYPE_CHECKING:
    from llama_cpp import Llama

    from stoker.supervisor.config import ModelConfig
    from stoker.workers.embeddings import Embedder

# Greedy and seeded prompts are evaluated in blocks of this many tokens at fixed positions (see
# evaluate_prompt). On the 2-core CI VM, Gemma 3 270M evaluates a 1,024-token prompt at 250 to
# 311 tokens/s in blocks of 32 to 1,024 tokens, 286 at 64: a small block costs nothing there
# and lets a shared prefix be reused down to 64 tokens. What it costs: the prompt's last block
# is evaluated again each time (docs/robustness.md: 207 against 38 ms to the first token for a
# 365-token prompt that differs from the last one in its final words).
CACHE_BLOCK = 64
# llama-cpp-python's default temperature for chat completions (plain completions default to 0.8).
_CHAT_TEMPERATURE = 0.2
# The context of the Llama object of a worker whose requests run in a batch engine.
_TOKENIZER_CTX = 64
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
    completion (up to how the streamed text re-tokenizes). Greedy and seeded prompts are
    evaluated in fixed blocks (LlamaBackend.evaluate_prompt), so what ran before on the worker
    changes nothing either."""

    def __init__(self, backend: "LlamaBackend", request: GenerationRequest) -> None:
        super().__init__()
        self._backend = backend
        self._stream: Iterator[dict[str, Any]] | None = None
        self._entries: deque[logprobs.Entry] | None = None  # sampled tokens' entries not yet streamed
        self._ahead = 0  # bytes of the next piece that entries already handed out cover
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
        gbnf = backend.grammars.gbnf(request.sampling)  # a bad one is refused here
        resumed = backend.resumed_tokens(prompt_ids, ids, request)
        if gbnf is not None:
            from llama_cpp.llama_grammar import LlamaGrammar

            kwargs["grammar"] = LlamaGrammar.from_string(gbnf)
            # The resumed text must fit the grammar (llama.cpp aborts on a token its grammar
            # refuses): walked through a grammar of our own first.
            backend.llama_cpp.llama_sampler_free(backend.grammars.sampler(gbnf, resumed))
        backend.on_decode = request.progress
        if request.resume and ids[: len(prompt_ids)] == prompt_ids:
            # Rebuild the KV cache the way the first run built it: the prompt in its blocks,
            # then each streamed token on its own (as generation evaluated them).
            backend.evaluate_prompt(prompt_ids)
            for token in ids[len(prompt_ids):]:
                llm.eval([token])
        elif request.sampling.get(Key.SEED, -1) != -1 or kwargs.get("temperature") == 0:
            backend.evaluate_prompt(ids)  # the whole of `ids` is in the cache: sampled from at once
        else:
            # Sampled at random anyway: llama-cpp-python reuses as much of the cache as matches,
            # which is cheaper (up to a block less to evaluate) and breaks the blocks past it.
            backend.reuse_freely(ids)
        if gbnf is not None and resumed:
            self._resume_grammar(backend, resumed)  # last: nothing between it and the stream may fail
        n_logprobs = logprobs.wanted(request.sampling)
        if n_logprobs is not None:
            self._record_logprobs(backend, n_logprobs)
        self._stream = llm.create_completion(ids, stream=True, max_tokens=request.max_tokens, **kwargs)

    @staticmethod
    def _resume_grammar(backend: "LlamaBackend", resumed: list[int]) -> None:
        """Llama builds its sampler chain (the grammar in it) as the stream starts: have it move
        the chain over the resumed text then, as if it had sampled that text itself."""
        llm, accept = backend.llm, backend.llama_cpp.llama_sampler_accept
        build = llm._init_sampler

        def init_sampler(*args: Any, **kwargs: Any) -> Any:
            del llm._init_sampler  # once: the class's own again
            sampler = build(*args, **kwargs)
            for token in resumed:
                accept(sampler.sampler, token)
            return sampler

        llm._init_sampler = init_sampler

    def _record_logprobs(self, backend: "LlamaBackend", n: int) -> None:
        """Have Llama's sampling note each token's entry, from the logits it was sampled from
        (the last output row then), for chunks() to hand out with the text it streams."""
        llm, llama_cpp = backend.llm, backend.llama_cpp
        sample, vocab, n_vocab = type(llm).sample.__get__(llm), llm._model.vocab, llm.n_vocab()
        piece = logprobs.token_pieces(llama_cpp, vocab)
        entries: deque[logprobs.Entry] = deque()

        def sampled(*args: Any, **kwargs: Any) -> int:
            token = sample(*args, **kwargs)
            if not llama_cpp.llama_vocab_is_eog(vocab, token):
                row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
                entries.append(logprobs.of_logits(row, token, n, piece))
            return token

        llm.sample = sampled  # this generation's; close() takes it away
        self._entries = entries

    def _entry_of(self, text: str) -> logprobs.Entry:
        """The entry of a streamed piece: the tokens sampled for its bytes (one, or several that
        make up one character), merged."""
        assert self._entries is not None
        need, taken = len(text.encode("utf-8")) - self._ahead, []
        while need > 0 and self._entries:
            taken.append(self._entries.popleft())
            need -= len(taken[-1][Key.BYTES])
        self._ahead = max(0, -need)
        return logprobs.merged(taken)

    def chunks(self) -> Iterator[Chunk]:
        if self._stream is None:
            return
        for part in self._stream:
            choice = part["choices"][0]
            if choice.get("finish_reason"):
                self.reason = Reason.LENGTH if choice["finish_reason"] == "length" else Reason.STOP
            if choice.get("text"):
                self.completion_tokens += 1
                entries = None if self._entries is None else [self._entry_of(choice["text"])]
                yield Chunk(choice["text"], 1, entries)
        if self.reason is None:
            self.reason = Reason.STOP

    def close(self) -> None:
        if self._stream is not None and hasattr(self._stream, "close"):
            self._stream.close()
        self._backend.llm.__dict__.pop("_init_sampler", None)  # a resume's, if it never started
        self._backend.llm.__dict__.pop("sample", None)


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
        import llama_cpp  # imported here, before the worker says hello: see Worker.run

        self.llama_cpp = llama_cpp
        self.model = model
        self.llm: "Llama"
        self.chat_temperature = _CHAT_TEMPERATURE
        self._formatter: Any = None
        self.on_decode: Callable[[], None] = lambda: None  # the running generation's progress
        self._whole_blocks = 0  # the cache's first tokens that evaluate_prompt put there in whole blocks

    def load(self) -> None:
        from llama_cpp import Llama

        path = ensure_demo_file() if self.model.demo else Path(self.model.path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"model file {path} does not exist (model '{self.model.name}')")
        threads = self.model.n_threads or usable_cores()
        batched = self.model.parallel > 1
        self.llm = Llama(
            model_path=str(path),
            # With parallel > 1 the requests run in the batch engine's own context: this one
            # only tokenizes and renders chats, and is kept small (its buffers cost memory).
            n_ctx=_TOKENIZER_CTX if batched else self.model.n_ctx,
            n_batch=_TOKENIZER_CTX if batched else 512,
            n_gpu_layers=self.model.n_gpu_layers,
            n_threads=threads,
            n_threads_batch=threads,
            chat_format=self.model.chat_format or None,
            verbose=False,
        )
        self._formatter = _chat_formatter(self.llm)
        self.grammars = Grammars(self.llm._model.vocab)  # the worker's one cache of checked grammars
        self._report_decodes()

    def _report_decodes(self) -> None:
        """Call on_decode after each llama_decode (a batch of a prompt, or one token), so the
        supervisor sees a long prompt advance. Through llama-cpp-python's context object, which
        is internal: without it, progress shows only as tokens."""
        ctx = getattr(self.llm, "_ctx", None)
        original = getattr(ctx, "decode", None)
        if original is None:
            return

        def decode(batch: Any) -> Any:
            result = original(batch)
            self.on_decode()
            return result

        ctx.decode = decode

    def evaluate_prompt(self, ids: list[int]) -> None:
        """For a greedy or seeded request: put `ids` in the KV cache, in blocks of CACHE_BLOCK tokens at fixed positions (0-63,
        64-127, ...), each block one llama_decode, reusing the whole blocks already there.

        llama.cpp's results depend slightly on the shape of the batch a token was evaluated in.
        llama-cpp-python reuses whatever prefix of the cache matches and evaluates the rest as
        one batch, so the same prompt after another request (or after a worker's restart) can
        get other logits, and a greedy or seeded sample another token. With fixed blocks every token's cache entry comes from the
        same batch of the same tokens, whatever ran before: the same request, the same text.
        Only whole blocks that were themselves evaluated this way are reused (not the partial
        last block of a prompt, nor generated tokens), and the last block is always evaluated
        again, for its logits."""
        llm = self.llm
        same = self._cached_prefix(ids, min(self._whole_blocks, llm.n_tokens, len(ids) - 1))
        start = same // CACHE_BLOCK * CACHE_BLOCK
        llm.n_tokens = start  # eval() drops the cache from here on
        for begin in range(start, len(ids), CACHE_BLOCK):
            llm.eval(ids[begin:begin + CACHE_BLOCK])
        self._whole_blocks = len(ids) // CACHE_BLOCK * CACHE_BLOCK

    def _cached_prefix(self, ids: list[int], limit: int) -> int:
        """How many of the first `limit` tokens of `ids` the cache holds already."""
        llm = self.llm
        if limit <= 0:
            return 0
        differ = np.nonzero(llm.input_ids[:limit] != np.asarray(ids[:limit], dtype=llm.input_ids.dtype))[0]
        return int(differ[0]) if len(differ) else limit

    def reuse_freely(self, ids: list[int]) -> None:
        """Leave the cache to create_completion's own prefix reuse: the whole blocks past what
        it keeps are whole blocks no more."""
        kept = self._cached_prefix(ids, min(self.llm.n_tokens, len(ids)) - 1)
        self._whole_blocks = min(self._whole_blocks, kept // CACHE_BLOCK * CACHE_BLOCK)

    def resumed_tokens(self, prompt_ids: list[int], ids: list[int], request: GenerationRequest) -> list[int]:
        """The tokens of the text a lost worker streamed: those `ids` (prompt plus that text)
        has past the prompt's, or, where the two tokenize differently at their seam, the text's
        own (without a tokenizer's leading space, which a grammar may not allow)."""
        if not request.resume:
            return []
        if ids[: len(prompt_ids)] == prompt_ids:
            return ids[len(prompt_ids):]
        return self.llm.tokenize(request.resume.encode("utf-8"), add_bos=False, special=False)

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
        if self.model.parallel > 1:
            raise RuntimeError("a llama model with parallel > 1 runs its requests through its engine")
        return LlamaGeneration(self, request)

    def embedder(self) -> "Embedder":
        from stoker.workers.llama_embed import LlamaEmbedder

        return LlamaEmbedder(self)

    def engine(self, parallel: int, progress: Callable[[], None]) -> Engine:
        """parallel = 1: one request at a time through Llama itself (its fixed-block prompt
        evaluation makes a request's text independent of what ran before). More: one context
        shared by that many sequences, stepped together (continuous batching)."""
        if parallel <= 1:
            return super().engine(parallel, progress)
        from stoker.workers.llama_batch import LlamaBatchEngine

        return LlamaBatchEngine(self, parallel, progress)
