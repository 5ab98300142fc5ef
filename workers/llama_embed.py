"""Embeddings from a llama model: a context of its own (embeddings on, the model's pooling),
sharing the worker's weights, made at the first embed. One llama_decode per batch of inputs,
each input its own sequence; llama.cpp pools each sequence's hidden states into its vector."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from stoker.workers.embeddings import MAX_INPUTS_PER_BATCH, Embedder

if TYPE_CHECKING:
    from stoker.workers.llama_backend import LlamaBackend

_POOLING = {"mean": "LLAMA_POOLING_TYPE_MEAN", "cls": "LLAMA_POOLING_TYPE_CLS", "last": "LLAMA_POOLING_TYPE_LAST"}


class LlamaEmbedder(Embedder):
    def __init__(self, backend: "LlamaBackend") -> None:
        # llama.cpp reserves an output per sequence id, and at most n_batch outputs in all.
        super().__init__(backend.model.embedding_ctx, min(MAX_INPUTS_PER_BATCH, backend.model.embedding_ctx))
        self.backend = backend
        self.model_name = backend.model.name
        self._llama_cpp = backend.llama_cpp
        self.ctx: Any = None
        self.batch: Any = None

    def prepare(self, text: str) -> tuple[Any, int]:
        # As llama-cpp-python's own embed() tokenizes: with BOS, special tokens as text.
        ids = self.backend.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        return ids, len(ids)

    def cut(self, item: Any, tokens: int) -> Any:
        return item[:tokens]

    def _open(self) -> None:
        """The embedding context: `capacity` cells and tokens per batch (every token of a pooled
        sequence must be in one batch), up to `max_inputs` sequences."""
        llama_cpp, llm = self._llama_cpp, self.backend.llm
        from llama_cpp import _internals

        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_ctx = params.n_batch = params.n_ubatch = self.capacity
        params.n_seq_max = self.max_inputs
        params.kv_unified = True
        params.embeddings = True
        params.pooling_type = getattr(llama_cpp, _POOLING[self.backend.model.pooling])
        params.n_outputs_max = 0  # pooling needs every token as an output (llama.cpp asserts otherwise)
        self.ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        self.batch = llama_cpp.llama_batch_init(self.capacity, 0, 1)
        self.n_embd = llm.n_embd()

    def evaluate(self, items: list[Any]) -> list[np.ndarray]:
        llama_cpp = self._llama_cpp
        if self.ctx is None:
            self._open()
        b, n = self.batch, 0
        for seq, ids in enumerate(items):
            for pos, token in enumerate(ids):
                b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = token, pos, 1, True
                b.seq_id[n][0] = seq
                n += 1
        b.n_tokens = n
        llama_cpp.llama_memory_clear(self.ctx.memory, True)
        code = llama_cpp.llama_decode(self.ctx.ctx, b)
        if code != 0:  # a context in a state we do not know: the worker dies, the job resumes elsewhere
            raise RuntimeError(f"llama_decode returned {code} for a batch of {n} embedding tokens")
        out = []
        for seq in range(len(items)):
            ptr = llama_cpp.llama_get_embeddings_seq(self.ctx.ctx, seq)
            out.append(np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy())
        return out
