"""Continuous batching for llama: up to `parallel` sequences in one llama context, one
llama_decode per step for all of them (llama-cpp-python's low-level API).

Each step puts in one batch the last sampled token of every generating sequence, and the next
chunks of the prompts of newly admitted ones, first come first served, at most PREFILL_BUDGET
prompt tokens a step (and the end of a prompt that would leave less than PREFILL_SLACK tokens
for the next) unless one runs alone (a long prompt is split over steps, so nobody waits
long for their next token, and prompts that arrive together start one after another).
Rows are ordered by sequence id, and a sequence gets the lowest free id: llama.cpp runs a batch
whose sequence ids are sorted and consecutive as one pass (split KV otherwise runs it as several,
about 2.7 times as slow at 8 sequences). Every sequence samples its own token from its own row
(greedy: the arg max of its logits; otherwise its own llama sampler chain, as Llama builds one,
with its own seed), turns it into text with an incremental UTF-8 decoder (a character split over
tokens is sent whole), holds back text that may begin a stop string, and ends on its own (end of
generation, stop, max_tokens, or its share of the context). An ended or cancelled sequence's KV
cells are freed before the next step.

The weights are those of the worker's `Llama` (one copy); the context is this engine's own:
n_ctx cells for each sequence, in one pool (kv_unified).
"""

from __future__ import annotations

import codecs
import ctypes
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from stoker.protocol.errors import BadRequest
from stoker.protocol.messages import Key, Reason
from stoker.workers.backend import Chunk, GenerationRequest
from stoker.workers.engine import Emitted, Engine, ended
from stoker.workers import logprobs
from stoker.workers.grammars import allowed
from stoker.workers.prefix_cache import MIN_SHARE, PrefixCache, common_prefix
from stoker.workers.stops import StopHolder

if TYPE_CHECKING:
    from stoker.workers.llama_backend import LlamaBackend

N_BATCH = 512  # tokens in one llama_decode at most (llama-cpp-python's default batch)
# Prompt tokens all sequences together add to one step, unless one runs alone: bounds how long
# the others' next token waits, and lets prompts that arrive together start one after another
# (first come, first prefilled) instead of all waiting for one long step. On 2 CPU cores with
# Gemma 3 270M, 8 prompts arriving at once got their first tokens after 300 ms (median) as one
# step; 64 tokens a step costs nothing in prompt speed there (250 to 311 tokens/s in blocks of 32
# to 1,024) and about halves that median.
PREFILL_BUDGET = 64
# A prompt is not split when less than this much of it would be left for the next step: the step
# takes it whole. Cutting 1 token off a 13-token prompt saves the step nothing and costs that
# prompt's first token a whole step (8 prompts of 13 tokens at once: the 5th waited for the
# second step).
PREFILL_SLACK = 16
# llama-cpp-python's defaults for create_completion, which a request's keys override.
DEFAULTS = {Key.TEMPERATURE: 0.8, Key.TOP_P: 0.95, Key.TOP_K: 40, Key.MIN_P: 0.05, Key.REPEAT_PENALTY: 1.0}
_LAST_N = 64  # the tokens a repeat penalty looks back over (Llama's last_n_tokens_size)
CACHE_SLOTS = 8  # finished requests' prefixes kept at most (see prefix_cache)


@dataclass
class Sequence:
    rid: int
    seq_id: int
    todo: list[int]  # tokens not yet in the KV cache (the prompt, then each sampled token)
    n_past: int  # tokens of it in the KV cache
    max_tokens: int
    prompt_tokens: int
    stops: StopHolder
    greedy: bool
    sampler: Any = None  # its llama sampler chain, unless greedy
    grammar: Any = None  # its llama grammar sampler, if its text is constrained
    logprobs: int | None = None  # alternatives per token, if it wants log-probabilities
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    completion_tokens: int = 0
    reason: Reason | None = None
    cancelled: bool = False
    row: int = -1  # its output row in the step's batch, if it has one
    past: list[int] = field(default_factory=list)  # its tokens in the KV cache, positions 0 .. n_past-1
    computed: int = 0  # of those, how many a decode has computed (the rest are in this step's batch)
    # Waiting to share the first n cells of a running request (rid, n) that has not computed
    # them yet: it computes nothing until it can.
    follow: tuple[int, int] | None = None
    order: int = 0  # when it was admitted: prompts are computed first come, first served
    generating: bool = False  # its prompt is in: each step adds the token it sampled last

    def close(self) -> None:
        if self.grammar is not None:
            import llama_cpp

            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None


class LlamaBatchEngine(Engine):
    def __init__(self, backend: "LlamaBackend", parallel: int, progress: Callable[[], None]) -> None:
        super().__init__(parallel)
        import llama_cpp
        from llama_cpp import _internals

        self._llama_cpp = llama_cpp
        self.backend = backend
        llm = backend.llm
        self.n_ctx = backend.model.n_ctx  # each sequence's share
        self.share = backend.model.share_prefixes
        budget = backend.model.prefix_cache if self.share else 0
        self.cache = PrefixCache(budget, first_id=parallel, slots=CACHE_SLOTS if budget else 0)
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_ctx = self.n_ctx * parallel + budget
        params.n_seq_max = parallel + self.cache.slots
        params.kv_unified = True
        params.n_batch = params.n_ubatch = N_BATCH
        # One output row per sequence at most: Gemma's 262k-word vocabulary makes llama.cpp's
        # default reservation (a row for every token of a batch) cost 514 MiB; this, about 60.
        # llama.cpp reserves a row for every sequence id at start, cache entries' included.
        params.n_outputs_max = params.n_seq_max + 1
        self.ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        self.mem = self.ctx.memory
        self.vocab = llm._model.vocab
        self.n_vocab = llm.n_vocab()
        self.n_swa = int(llama_cpp.llama_model_n_swa(llm._model.model))
        self.batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self._token_bytes = logprobs.token_pieces(llama_cpp, self.vocab)
        self.progress = progress
        self.seqs: dict[int, Sequence] = {}
        self._internals = _internals
        self._candidates: Any = None  # a row's logits as llama candidates (made when first needed)
        self.shared_tokens = 0  # prompt tokens not computed, their cells shared (a measure, for tests)
        self._admitted = 0

    def close(self) -> None:
        for seq in self.seqs.values():
            seq.close()
        if self.batch is not None:
            self._llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        self.ctx.close()

    @property
    def running(self) -> int:
        return len(self.seqs)

    # ---- admitting -----------------------------------------------------------------------------

    def admit(self, rid: int, request: GenerationRequest) -> None:
        self._refuse_when_full(rid)
        backend, llm = self.backend, self.backend.llm
        sampling = dict(request.sampling)
        stops = list(request.stop)
        if request.prompt is not None:
            prompt, add_bos = request.prompt, True
        else:
            rendered = backend.render_chat(list(request.messages or []))
            prompt, add_bos = rendered.prompt, not rendered.added_special
            sampling.setdefault(Key.TEMPERATURE, backend.chat_temperature)
            if rendered.stop:
                stops += [rendered.stop] if isinstance(rendered.stop, str) else list(rendered.stop)

        def tokens(text: str) -> list[int]:
            return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

        prompt_ids = tokens(prompt)
        ids = tokens(prompt + request.resume) if request.resume else prompt_ids
        if not ids:  # an empty prompt, for a model that adds no BOS: nothing to compute from
            raise BadRequest(f"the prompt is empty and model '{backend.model.name}' adds no token of its own; "
                             "send some text")
        reason = None
        if len(ids) >= self.n_ctx:
            if not request.resume:
                what = "prompt" if request.prompt is not None else "chat"
                raise BadRequest(
                    f"the {what} is {len(ids)} tokens but model '{backend.model.name}' has a context of {self.n_ctx} "
                    f"tokens per request (n_ctx); shorten the {what} or raise n_ctx in the model's configuration")
            reason = Reason.LENGTH  # the first run stopped at the context's end
        if request.max_tokens <= 0:
            reason = Reason.LENGTH
        gbnf = self.backend.grammars.gbnf(sampling)  # a bad one is refused here, before anything changes
        grammar = None
        if gbnf is not None and reason is None:
            grammar = self.backend.grammars.sampler(gbnf, self.backend.resumed_tokens(prompt_ids, ids, request))
        params = {**DEFAULTS, **{k: v for k, v in sampling.items() if k in DEFAULTS}}
        greedy = params[Key.TEMPERATURE] <= 0 and params[Key.REPEAT_PENALTY] == 1.0
        seq = Sequence(rid, self._free_seq_id(), ids, 0, request.max_tokens, len(prompt_ids), StopHolder(stops),
                       greedy, grammar=grammar, logprobs=logprobs.wanted(sampling), reason=reason)
        self._admitted += 1
        seq.order = self._admitted
        if not greedy and reason is None:
            seed = int(sampling.get(Key.SEED, -1))
            seq.sampler = self._sampler(params, random.getrandbits(32) if seed == -1 else seed)
        if reason is None and self.share:
            self._share(seq)
        self.seqs[rid] = seq

    # ---- shared prefixes -----------------------------------------------------------------------

    def _share(self, seq: Sequence) -> None:
        """Start `seq` from the cells of the longest prefix it shares with a cached request or a
        running one (whose cells may still be to come: then it follows that one)."""
        wanted = seq.todo
        entry, length = self.cache.best(wanted)
        source: Sequence | None = None
        for other in self.seqs.values():
            if other is not seq and other.follow is None and not other.cancelled and other.reason is None:
                n = common_prefix(other.past + other.todo, wanted)
                if n > length:
                    source, length = other, n
        length = min(length, len(wanted) - 1)  # its last prompt token is computed, for its logits
        if length < MIN_SHARE:
            return
        if source is None:
            assert entry is not None
            if self._window_kept(entry.seq_id, length):
                self._copy(entry.seq_id, seq, length)
        elif source.computed >= length:
            if self._window_kept(source.seq_id, length):
                self._copy(source.seq_id, seq, length)
        else:
            seq.follow = (source.rid, length)

    def _window_kept(self, src_seq_id: int, length: int) -> bool:
        """Whether the source still has the cells a sequence continuing at `length` attends to. A
        sliding-window model's cache (Gemma 3: 512) frees cells that fell out of every
        sequence's window; shared from such a source, the new one would see a broken window and
        go wrong without a word. llama-server checks the same before reusing cells."""
        if self.n_swa <= 0:
            return True
        first = self._llama_cpp.llama_memory_seq_pos_min(self.mem, src_seq_id)
        return first <= max(0, length - self.n_swa)

    def _copy(self, src_seq_id: int, seq: Sequence, length: int) -> None:
        self._llama_cpp.llama_memory_seq_cp(self.mem, src_seq_id, seq.seq_id, 0, length)
        self.shared_tokens += length
        seq.past = seq.todo[:length]
        del seq.todo[:length]
        seq.n_past = seq.computed = length

    def _resolve(self, seq: Sequence) -> bool:
        """Whether a following sequence can compute this step: the cells it waits for are there
        (now shared), or the request it followed went (then it starts from what is cached, or
        from nothing)."""
        assert seq.follow is not None
        rid, length = seq.follow
        source = self.seqs.get(rid)
        if source is not None and not source.cancelled and source.reason is None:
            if source.computed < length:  # not before the decode that computes them
                return False
            seq.follow = None
            if self._window_kept(source.seq_id, length):
                self._copy(source.seq_id, seq, length)
            return True
        seq.follow = None
        self._share(seq)
        return seq.follow is None or self._resolve(seq)

    def _free_seq_id(self) -> int:
        taken = {s.seq_id for s in self.seqs.values()}
        return next(i for i in range(self.parallel) if i not in taken)

    def _sampler(self, p: dict[str, Any], seed: int) -> Any:
        """The chain Llama builds for create_completion (penalties, top-k, typical, top-p, min-p,
        temperature, then a seeded draw), so a seeded request samples as it would alone."""
        s = self._internals.LlamaSampler()
        s.add_penalties(self.n_vocab, _LAST_N, p[Key.REPEAT_PENALTY], 0.0, 0.0)
        if p[Key.TEMPERATURE] <= 0:
            s.add_greedy()
            return s
        s.add_top_k(int(p[Key.TOP_K]))
        s.add_typical(1.0, 1)
        s.add_top_p(p[Key.TOP_P], 1)
        s.add_min_p(p[Key.MIN_P], 1)
        s.add_temp(p[Key.TEMPERATURE])
        s.add_dist(seed & 0xFFFFFFFF)
        return s

    def cancel(self, rid: int) -> None:
        seq = self.seqs.get(rid)
        if seq is not None:
            seq.cancelled = True

    # ---- stepping ------------------------------------------------------------------------------

    def reap(self) -> list[Emitted]:
        out: list[Emitted] = []
        for seq in list(self.seqs.values()):  # cancelled, or ended at admission
            if seq.cancelled:
                seq.completion_tokens = seq.stops.sent_tokens  # held-back text is never sent
                out.append(self._finish(seq, Reason.CANCELLED))
            elif seq.reason is not None:
                out.append(self._finish(seq, seq.reason))
        return out

    def step(self) -> list[Emitted]:
        out = self.reap()
        if not self.seqs:
            return out
        rows = self._fill()
        if not rows:
            # Every sequence waits for cells that no running one computes: a bug, but not one
            # to spin on. They compute their prompts themselves.
            for seq in self.seqs.values():
                seq.follow = None
            rows = self._fill()
            if not rows:
                raise RuntimeError(f"a step of {len(self.seqs)} sequences put nothing in its batch")
        code = self._llama_cpp.llama_decode(self.ctx.ctx, self.batch)
        if code != 0:
            # The context is in a state this engine does not know (no KV slot, an abort): the
            # worker dies, and the supervisor resumes its requests on a new one, as after a crash.
            raise RuntimeError(f"llama_decode returned {code} for a batch of {self.batch.n_tokens} tokens")
        self.progress()
        for seq in rows:
            seq.computed = seq.n_past
            if seq.row >= 0:
                out += self._sampled(seq, self._sample(seq))
        return out

    def _fill(self) -> list[Sequence]:
        """Put this step's tokens in the batch; the sequences in it, in sequence-id order."""
        b = self.batch
        n = 0
        in_batch = []
        ready = [s for s in self.seqs.values() if s.follow is None or self._resolve(s)]
        # Prompt tokens each sequence puts in this step: generating ones their one token; the
        # others share the budget in the order they came (all of N_BATCH for one alone).
        budget = N_BATCH if len(self.seqs) == 1 else PREFILL_BUDGET
        takes: dict[int, int] = {}
        for seq in sorted(ready, key=lambda s: s.order):
            if seq.generating:
                takes[seq.rid] = 1
            else:
                take = min(len(seq.todo), max(budget, 0))
                if take and len(seq.todo) - take < PREFILL_SLACK:
                    take = len(seq.todo)
                takes[seq.rid] = take
                budget -= take
        for seq in self.seqs.values():
            seq.row = -1
        for seq in sorted(ready, key=lambda s: s.seq_id):
            take = min(takes[seq.rid], N_BATCH - n)
            if take <= 0:
                continue
            for i, token in enumerate(seq.todo[:take]):
                b.token[n] = token
                b.pos[n] = seq.n_past + i
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = seq.seq_id
                b.logits[n] = False
                n += 1
            seq.past += seq.todo[:take]
            del seq.todo[:take]
            seq.n_past += take
            if not seq.todo:  # all of it in: sample from its last row
                seq.row = n - 1
                b.logits[seq.row] = True
                seq.generating = True
            in_batch.append(seq)
        b.n_tokens = n
        return in_batch

    def _sample(self, seq: Sequence) -> int:
        llama_cpp = self._llama_cpp
        if seq.grammar is None:
            if seq.greedy:
                return int(np.argmax(self._logits(seq)))
            return int(llama_cpp.llama_sampler_sample(seq.sampler.sampler, self.ctx.ctx, seq.row))
        # Constrained: what the model would say is checked against the grammar, and only if the
        # grammar refuses it are all candidates checked (slow: about 25 ms a token for Gemma's
        # vocabulary) and the token chosen again among those allowed, as llama.cpp's own
        # common sampler does.
        if seq.greedy:
            token = int(np.argmax(self._logits(seq)))
            if not allowed(seq.grammar, token):
                cur, view = self._candidates_of(seq, seq.grammar)
                token = int(view["id"][int(np.argmax(view["logit"][: cur.size]))])
        else:
            cur, _ = self._candidates_of(seq, None)
            llama_cpp.llama_sampler_apply(seq.sampler.sampler, ctypes.byref(cur))
            token = int(cur.data[cur.selected].id)
            if not allowed(seq.grammar, token):
                cur, _ = self._candidates_of(seq, seq.grammar)
                llama_cpp.llama_sampler_apply(seq.sampler.sampler, ctypes.byref(cur))
                token = int(cur.data[cur.selected].id)
            llama_cpp.llama_sampler_accept(seq.sampler.sampler, token)
        if not llama_cpp.llama_vocab_is_eog(self.vocab, token):
            llama_cpp.llama_sampler_accept(seq.grammar, token)
        return token

    def _logits(self, seq: Sequence) -> Any:
        return np.ctypeslib.as_array(self._llama_cpp.llama_get_logits_ith(self.ctx.ctx, seq.row),
                                     shape=(self.n_vocab,))

    def _candidates_of(self, seq: Sequence, grammar: Any) -> tuple[Any, Any]:
        """`seq`'s row as llama candidates, with those `grammar` refuses (if given) at -inf: the
        array, and a numpy view of its data (in token order until a sampler sorts it)."""
        llama_cpp = self._llama_cpp
        if self._candidates is None:
            data = (llama_cpp.llama_token_data * self.n_vocab)()
            view = np.frombuffer(data, dtype=np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)],
                                                      align=True))
            self._candidates = (data, view, np.arange(self.n_vocab, dtype=np.intc))
        data, view, ids = self._candidates
        view["id"] = ids
        view["logit"] = self._logits(seq)
        view["p"] = 0.0
        cur = llama_cpp.llama_token_data_array(data=data, size=self.n_vocab, selected=-1, sorted=False)
        if grammar is not None:
            llama_cpp.llama_sampler_apply(grammar, ctypes.byref(cur))
        return cur, view

    def _sampled(self, seq: Sequence, token: int) -> list[Emitted]:
        """One new token of `seq`: its text (once whole and clear of stop strings), maybe its end."""
        if self._llama_cpp.llama_vocab_is_eog(self.vocab, token):
            return self._release(seq, seq.stops.finish()) + [self._finish(seq, Reason.STOP)]
        seq.completion_tokens += 1
        piece = self._token_bytes(token)
        text = seq.decoder.decode(piece)
        entry = None
        if seq.logprobs is not None:
            entry = logprobs.of_logits(self._logits(seq), token, seq.logprobs, self._token_bytes)
        chunks, hit = seq.stops.push(text, entry)
        out = self._release(seq, chunks)
        if hit:
            seq.completion_tokens = seq.stops.sent_tokens
            return out + [self._finish(seq, Reason.STOP)]
        if seq.completion_tokens >= seq.max_tokens or seq.n_past + 1 >= self.n_ctx:
            # A character cut by the end is dropped (its tokens still count), not sent broken.
            return out + self._release(seq, seq.stops.finish()) + [self._finish(seq, Reason.LENGTH)]
        seq.todo.append(token)
        return out

    def _release(self, seq: Sequence, chunks: list[Chunk]) -> list[Emitted]:
        return [Emitted(seq.rid, chunk=c) for c in chunks if c.n or c.text]

    def _finish(self, seq: Sequence, reason: Reason) -> Emitted:
        """Forget the sequence: its cells stay as a prefix cache entry, if the cache takes it,
        or are freed; its id is free for the next request."""
        self.seqs.pop(seq.rid, None)
        if seq.n_past:
            rm, cp = self._llama_cpp.llama_memory_seq_rm, self._llama_cpp.llama_memory_seq_cp
            if self.cache.budget:
                cache_id, drop = self.cache.admit(seq.past)
                for old in drop:
                    rm(self.mem, old, -1, -1)
                if cache_id is not None:
                    cp(self.mem, seq.seq_id, cache_id, -1, -1)
            rm(self.mem, seq.seq_id, -1, -1)
        seq.close()
        return ended(seq.rid, reason, seq.prompt_tokens, seq.completion_tokens)
