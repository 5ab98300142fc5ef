"""The real Gemma with `parallel` sequences in one context (continuous batching): through the
supervisor, and the engine in-process for what only it shows (text equal to Llama alone, a
character split over tokens, stop strings, freed KV cells)."""

from __future__ import annotations

import threading
import time

import pytest

from stoker.protocol.client import Token
from stoker.supervisor.config import ModelConfig
from stoker.workers.backend import GenerationRequest

from .test_gemma import gemma

pytestmark = pytest.mark.model

PROMPTS = [f"Write a short story about a {w} who" for w in ("cat", "dog", "robot", "king")]


def gemma_parallel(parallel: int = 4, n_ctx: int = 1024) -> str:
    return gemma(n_ctx) + f"parallel = {parallel}\n"


@pytest.fixture
def llama():
    """A fresh in-process Llama on the demo file, as a user would run it (the reference). Fresh:
    Llama reuses what its cache holds, which changes the batch shapes and so, at near-ties, the
    text."""
    from llama_cpp import Llama

    from stoker.workers.demo_model import ensure_demo_file

    return Llama(model_path=str(ensure_demo_file()), n_ctx=1024, n_threads=2, verbose=False)


@pytest.fixture(scope="module")
def engine():
    from stoker.workers.demo_model import ensure_demo_file
    from stoker.workers.llama_backend import LlamaBackend

    backend = LlamaBackend(ModelConfig(name="g", backend="llama", path=str(ensure_demo_file()), n_ctx=256,
                                       parallel=4, n_threads=2, prefix_cache=1024))
    backend.load()
    eng = backend.engine(4, lambda: None)
    yield eng
    eng.close()


def run(eng, requests: dict) -> dict:
    """Admit {rid: GenerationRequest} and step until all end: rid -> (text, end, chunks)."""
    for rid, req in requests.items():
        eng.admit(rid, req)
    texts: dict = {rid: [] for rid in requests}
    ends: dict = {}
    while eng.running:
        for out in eng.step():
            if out.chunk is not None:
                texts[out.rid].append(out.chunk)
            if out.final:
                ends[out.rid] = out
    return {rid: ("".join(c.text for c in texts[rid]), ends[rid], texts[rid]) for rid in requests}


def test_four_concurrent_greedy_requests_each_get_fluent_text_of_the_right_length(start_supervisor):
    sup = start_supervisor(models=gemma_parallel(), default_model="gemma")
    results: dict = {}
    firsts: dict = {}

    def one(i: int) -> None:
        with sup.client() as c:
            text, started = "", time.monotonic()
            for ev in c.stream(PROMPTS[i], max_tokens=40, temperature=0):
                if isinstance(ev, Token):
                    firsts.setdefault(i, time.monotonic())
                    text += ev.text
                else:
                    end = ev
            results[i] = (text, end, started)

    with sup.client() as c:
        c.load("gemma")
    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    running = 0
    while any(t.is_alive() for t in threads):
        running = max(running, max((w["running"] for w in sup.workers("gemma")), default=0))
        time.sleep(0.05)
    assert running == 4  # all four ran at once in the one worker
    assert len(sup.workers("gemma")) == 1
    assert sorted(results) == [0, 1, 2, 3]  # a thread that failed left no result
    for i, (text, end, _) in results.items():
        assert end.reason == "length" and end.usage["completion_tokens"] == 40
        words = text.split()
        assert len(words) >= 15 and len(set(words)) >= 8, text  # real words, not one repeated token
        assert "\ufffd" not in text and all(ch.isprintable() or ch in "\n\t" for ch in text), text


def test_a_request_alone_gives_the_text_of_llama_in_process(engine, llama):
    prompt = PROMPTS[0]
    [(text, end, _)] = run(engine, {1: GenerationRequest(prompt, None, 48, {"temperature": 0})}).values()
    ref = llama.create_completion(prompt, max_tokens=48, temperature=0)
    assert text == ref["choices"][0]["text"]
    assert end.completion_tokens == ref["usage"]["completion_tokens"] == 48
    assert end.prompt_tokens == ref["usage"]["prompt_tokens"]


def test_a_seeded_request_alone_samples_as_llama_does(engine, llama):
    prompt = "Once upon a time"
    keys = {"temperature": 0.9, "seed": 1234, "top_k": 40, "top_p": 0.9}
    [(text, _, _)] = run(engine, {1: GenerationRequest(prompt, None, 32, keys)}).values()
    ref = llama.create_completion(prompt, max_tokens=32, temperature=0.9, seed=1234, top_k=40, top_p=0.9)
    assert text == ref["choices"][0]["text"]


def test_text_split_over_tokens_is_sent_whole_and_stop_strings_end_one_sequence(engine):
    # Egyptian hieroglyphs are four byte tokens each in Gemma's vocabulary (byte fallback), and
    # Gemma copies them: no chunk may hold a broken character (one would show as U+FFFD).
    reqs = {
        1: GenerationRequest("Copy exactly: 𓀀𓀁𓀂𓀃 𓀀𓀁𓀂𓀃 𓀀𓀁𓀂𓀃", None, 20, {"temperature": 0}),
        2: GenerationRequest("Count: one, two, three, four,", None, 40, {"temperature": 0, "stop": [" six"]}),
        3: GenerationRequest("The capital of France is", None, 20, {"temperature": 0}),
    }
    done = run(engine, reqs)
    assert "𓀀𓀁" in done[1][0]  # it did copy them, a byte a token
    for text, _, chunks in done.values():
        assert "\ufffd" not in text and all("\ufffd" not in c.text for c in chunks)
    text2, end2, chunks2 = done[2]
    assert end2.reason.value == "stop" and " six" not in text2 and "five" in text2
    assert end2.completion_tokens == sum(c.n for c in chunks2)
    assert done[3][1].completion_tokens == 20


def test_cancel_frees_its_cells_and_a_long_prompt_joins_in_chunks(engine):
    from llama_cpp import llama_memory_seq_pos_max

    long_prompt = "Tell me about trains. " * 40  # about 200 tokens: several prefill chunks
    engine.admit(1, GenerationRequest(PROMPTS[1], None, 100, {"temperature": 0}))
    engine.step()
    engine.admit(2, GenerationRequest(long_prompt, None, 8, {"temperature": 0}))
    steps_until_first = 0
    got_first = False
    while not got_first:
        outs = engine.step()
        steps_until_first += 1
        assert any(o.rid == 1 and o.chunk for o in outs) or any(o.rid == 1 and o.final for o in outs)
        got_first = any(o.rid == 2 and o.chunk for o in outs)
    assert steps_until_first >= 2  # its prompt went in over several steps, request 1 streaming on
    seq1 = engine.seqs[1].seq_id
    engine.cancel(1)
    [end] = [o for o in engine.step() if o.rid == 1 and o.final]
    assert end.reason.value == "cancelled"
    assert llama_memory_seq_pos_max(engine.mem, seq1) == -1  # its cells are free
    while engine.running:
        engine.step()


def test_prompts_arriving_together_are_not_split_to_leave_a_stub(engine):
    from stoker.workers.llama_batch import PREFILL_BUDGET, PREFILL_SLACK

    prompts = [f"Write a short story about a {w} who lives in a lighthouse by the sea and keeps its lamp lit "
               "through every storm" for w in ("cat", "dog", "robot")]
    for rid, prompt in enumerate(prompts, 20):
        engine.admit(rid, GenerationRequest(prompt, None, 4, {"temperature": 0}))
    lengths = [len(engine.seqs[rid].todo) for rid in (20, 21, 22)]
    # The third prompt would be cut short of the budget with less than PREFILL_SLACK tokens left.
    assert sum(lengths[:2]) < PREFILL_BUDGET < sum(lengths) < PREFILL_BUDGET + PREFILL_SLACK
    outs = engine.step()
    assert sorted({o.rid for o in outs if o.chunk}) == [20, 21, 22]  # all three first tokens in one step
    while engine.running:
        engine.step()


def test_a_prompt_too_long_for_its_share_of_the_context_is_refused_and_changes_nothing(engine):
    from stoker.protocol.errors import BadRequest

    with pytest.raises(BadRequest, match="context of 256 tokens per request"):
        engine.admit(9, GenerationRequest("word " * 400, None, 8, {}))
    assert engine.running == 0


SHARED = ("You are given one item of a list and must describe it for a catalogue. Write plainly, in full "
          "sentences, without lists or headings. Mention what it is and what it is for. ") * 4


def test_requests_sharing_a_prefix_share_its_cells_running_or_finished(engine):
    before = engine.shared_tokens
    prompts = {i: GenerationRequest(SHARED + f"Item: {w}. Description:", None, 12, {"temperature": 0})
               for i, w in enumerate(("a kettle", "a lamp", "a bell"))}
    done = run(engine, prompts)  # three at once: two follow the first's prefill
    prefix = len(engine.backend.llm.tokenize(SHARED.encode(), add_bos=True, special=True))
    assert engine.shared_tokens - before >= 2 * (prefix - 2)
    for text, end, _ in done.values():
        assert end.completion_tokens == 12 and len(text.split()) >= 4 and "\ufffd" not in text
    # A later request that extends a finished one starts from the cache.
    before = engine.shared_tokens
    [(text, end, _)] = run(engine, {9: GenerationRequest(SHARED + "Item: a kettle. Description:", None, 12,
                                                         {"temperature": 0})}).values()
    assert engine.shared_tokens - before >= prefix
    assert engine.cache.tokens <= engine.cache.budget


def test_with_sharing_off_nothing_is_shared_and_by_default_nothing_is_kept():
    from stoker.workers.demo_model import ensure_demo_file
    from stoker.workers.llama_backend import LlamaBackend

    backend = LlamaBackend(ModelConfig(name="g", backend="llama", path=str(ensure_demo_file()), n_ctx=256,
                                       parallel=2, n_threads=2, share_prefixes=False))
    backend.load()
    off = backend.engine(2, lambda: None)
    try:
        reqs = {i: GenerationRequest(SHARED + f"Item {i}:", None, 4, {"temperature": 0}) for i in range(2)}
        run(off, reqs)
        assert off.shared_tokens == 0 and off.cache.entries == {}
    finally:
        off.close()


@pytest.mark.timeout(60)
def test_a_request_following_another_that_ends_at_once_still_runs(engine):
    """B waits for A's prefix cells; A ends at its first token (before B could share them)."""
    fresh = "Inventory of the night train. " + SHARED  # shared by nothing cached
    reqs = {
        1: GenerationRequest(fresh + "Item: a kettle. Description:", None, 1, {"temperature": 0}),
        2: GenerationRequest(fresh + "Item: a lamp. Description:", None, 6, {"temperature": 0}),
    }
    for rid, req in reqs.items():
        engine.admit(rid, req)
    assert engine.seqs[2].follow is not None  # B follows A's prefill
    ends = {}
    for _ in range(200):
        for out in engine.step():
            if out.final:
                ends[out.rid] = out
        if not engine.running:
            break
    assert ends[1].completion_tokens == 1 and ends[2].completion_tokens == 6


def test_a_batched_worker_killed_mid_stream_resumes_every_sequence(start_supervisor):
    import os
    import signal

    from tests.integration.helpers import raw_socket, recv, send, text_of

    sup = start_supervisor(models=gemma_parallel(), default_model="gemma")
    sock = raw_socket(sup.endpoint)
    ids = ["r0", "r1", "r2"]
    for i, rid in enumerate(ids):
        send(sock, op="generate", id=rid, prompt=PROMPTS[i], max_tokens=48, temperature=0)
    seen: dict = {rid: [] for rid in ids}
    while min(sum(r.get("n", 0) for r in seen[rid] if r["ev"] == "token") for rid in ids) < 8:
        msg = recv(sock, 60)
        seen[msg["id"]].append(msg)
    [w] = sup.workers("gemma")
    assert w["running"] == 3
    os.kill(w["pid"], signal.SIGKILL)
    open_ids = set(ids)
    while open_ids:
        msg = recv(sock, 120)
        seen[msg["id"]].append(msg)
        if msg["ev"] in ("end", "error"):
            open_ids.discard(msg["id"])
    for rid in ids:
        end = seen[rid][-1]
        assert end["ev"] == "end" and end["reason"] == "length", end
        text = text_of(seen[rid])  # seq contiguous: nothing repeated or missing
        assert end["usage"]["completion_tokens"] == 48 and len(text.split()) >= 15
    sock.close()


def test_a_sequence_that_fills_its_share_of_the_context_ends_with_length_alone(engine):
    long_prompt = "A long line of freight cars rolled past the station. " * 18  # about 200 of its 256
    n = len(engine.backend.llm.tokenize(long_prompt.encode(), add_bos=True, special=True))
    assert 150 < n < 250
    done = run(engine, {1: GenerationRequest(long_prompt, None, 500, {"temperature": 0}),
                        2: GenerationRequest("The capital of France is", None, 90, {"temperature": 0})})
    text, end, chunks = done[1]
    assert end.reason.value == "length" and n + end.completion_tokens <= 256
    assert end.completion_tokens == sum(c.n for c in chunks) and end.completion_tokens >= 256 - n - 2
    assert done[2][1].completion_tokens == 90  # the other went on to its own end
