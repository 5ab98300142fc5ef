"""The real Gemma 3 270M (the `demo` extra) through a real supervisor and real workers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stoker.protocol.client import End, Token
from stoker.protocol.errors import BadRequest

pytestmark = pytest.mark.model

RAW_CLIENT = Path(__file__).parent.parent / "integration" / "raw_client.py"
PROMPT = "The capital of France is"


def gemma(n_ctx: int = 2048) -> str:
    from stoker.workers.demo_model import ensure_demo_file

    return (f'[models.gemma]\nbackend = "llama"\npath = "{ensure_demo_file()}"\nn_ctx = {n_ctx}\n'
            'chat_format = "gemma"\n')


def test_gemma_streams_token_by_token_and_greedy_is_repeatable(start_supervisor):
    sup = start_supervisor(models=gemma(), default_model="gemma")
    with sup.client() as c:
        events = list(c.stream(PROMPT, max_tokens=16, temperature=0, seed=1))
        again = c.complete(PROMPT, max_tokens=16, temperature=0, seed=1).text
    tokens = [e for e in events if isinstance(e, Token)]
    end = events[-1]
    text = "".join(t.text for t in tokens)
    assert isinstance(end, End) and end.reason in ("stop", "length")
    assert len(tokens) > 1 and text.strip(), "expected real text, streamed in several frames"
    assert [t.seq for t in tokens] == [sum(t.n for t in tokens[:i]) for i in range(len(tokens))]
    assert end.usage["completion_tokens"] == sum(t.n for t in tokens)
    assert end.usage["prompt_tokens"] >= 5
    assert end.timings["load_ms"] > 0 and end.timings["ttft_ms"] > 0
    assert again == text
    [w] = sup.workers("gemma")
    assert w["rss_bytes"] > 100 * 2**20  # the model really is in that process's memory


def test_a_raw_client_written_from_the_protocol_readme_gets_the_same_text(start_supervisor):
    sup = start_supervisor(models=gemma(), default_model="gemma")
    with sup.client() as c:
        expected = c.complete(PROMPT, max_tokens=12, temperature=0, seed=7).text
    raw = subprocess.run(
        [sys.executable, str(RAW_CLIENT), "--endpoint", sup.endpoint, "--prompt", PROMPT,
         "--max-tokens", "12", "--temperature", "0", "--seed", "7", "--check"],
        capture_output=True, text=True, timeout=120,
    )
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout.rstrip("\n") == expected
    summary = json.loads(raw.stderr.strip().splitlines()[-1])
    assert summary["tokens"] == summary["usage"]["completion_tokens"]


def test_chat_messages_use_the_models_template(start_supervisor):
    sup = start_supervisor(models=gemma(), default_model="gemma")
    with sup.client() as c:
        events = list(c.stream(messages=[{"role": "user", "content": "Say hello."}], max_tokens=12, temperature=0))
    assert "".join(e.text for e in events if isinstance(e, Token)).strip()
    assert events[-1].usage["prompt_tokens"] > 5  # the template wraps the message in turn markers


def test_a_prompt_longer_than_the_context_is_a_bad_request_not_a_crash(start_supervisor):
    sup = start_supervisor(models=gemma(n_ctx=64), default_model="gemma")
    with sup.client() as c:
        with pytest.raises(BadRequest, match="n_ctx"):
            c.complete("stoke the fire " * 100, max_tokens=4).text
        [w] = sup.workers("gemma")
        assert c.complete(PROMPT, max_tokens=4, temperature=0).text.strip()  # same worker, still fine
        with pytest.raises(BadRequest, match="context"):
            c.complete(messages=[{"role": "user", "content": "stoke the fire " * 100}], max_tokens=4).text
    [w2] = sup.workers("gemma")
    assert w2["pid"] == w["pid"] and w2["served"] == 3


def test_cancel_a_real_generation(start_supervisor):
    sup = start_supervisor(models=gemma(), default_model="gemma")
    with sup.client() as c:
        stream = c.stream("Write a long story about a steam engine.", max_tokens=400)
        for ev in stream:
            if isinstance(ev, Token):
                break
        stream.close()  # leaving early cancels
        assert c.complete(PROMPT, max_tokens=3, temperature=0).text.strip()
        # An explicit cancel mid-stream: the end says cancelled, well before max_tokens.
        running = c.generate("Write a long story about a steam engine.", max_tokens=400)
        events = running.events()
        while not isinstance(next(events), Token):
            pass
        assert c.cancel(running)
        for _ in events:
            pass
        assert running.end is not None and running.end.reason == "cancelled"
        assert running.end.usage["completion_tokens"] < 400
    [w] = sup.workers("gemma")
    assert w["served"] == 3
    # The first request's log line says it was cancelled (its client left it), not that it ran out.
    assert sup.log().count(": cancelled, ") >= 2, sup.log()[-2000:]


def test_the_embedded_default_model_needs_no_configuration(start_supervisor):
    sup = start_supervisor(models="", default_model="gemma-3-270m")
    with sup.client() as c:
        [row] = [m for m in c.models()["models"] if m["name"] == "gemma-3-270m"]
        assert row["size_bytes"] > 200 * 2**20 and row["backend"] == "llama"
        assert c.complete(PROMPT, max_tokens=8, temperature=0).text.strip()
        assert c.complete(messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0).text.strip()


def test_unseeded_generations_differ_even_right_after_a_load(start_supervisor):
    sup = start_supervisor(models=gemma(), default_model="gemma")
    texts = []
    with sup.client() as c:
        for _ in range(2):
            c.load("gemma")
            texts.append(c.complete("Once upon a time", max_tokens=24, temperature=1.0).text)
            c.unload("gemma")
        texts.append(c.complete("Once upon a time", max_tokens=24, temperature=1.0, seed=-1).text)
    assert len(set(texts)) == 3, texts


@pytest.mark.parametrize("chat", [False, True], ids=["prompt", "chat"])
def test_a_stream_resumed_after_kill_9_gives_the_greedy_text_of_an_uninterrupted_run(start_supervisor, chat):
    import os
    import signal

    sup = start_supervisor(models=gemma(), default_model="gemma")
    ask = {"messages": [{"role": "user", "content": "Tell me about steam engines."}]} if chat else {"prompt": PROMPT}
    with sup.client() as c:
        # Each run is the first on a fresh worker: llama-cpp-python reuses a worker's KV cache
        # between requests, which can change greedy text by itself (see LlamaGeneration).
        events, killed = [], None
        for event in c.stream(max_tokens=48, temperature=0, **ask):
            events.append(event)
            if killed is None and isinstance(event, Token) and event.seq >= 10:
                [w] = sup.workers("gemma", "busy")
                killed = w["pid"]
                os.kill(killed, signal.SIGKILL)
        c.unload("gemma")
        expected = c.complete(max_tokens=48, temperature=0, **ask).text
    tokens = [e for e in events if isinstance(e, Token)]
    assert killed is not None and isinstance(events[-1], End)
    assert [t.seq for t in tokens] == [sum(t.n for t in tokens[:i]) for i in range(len(tokens))]
    assert "".join(t.text for t in tokens) == expected
    assert "resuming request" in sup.log()


def test_the_same_greedy_request_gives_the_same_text_whatever_ran_before_on_the_worker(start_supervisor):
    """The protocol's promise: same seed + same request = same text, warm, after other prompts
    that share part of it, and on a new worker. (Before prompts were evaluated in fixed blocks,
    a prompt after a partly matching one could get another text.)"""
    sup = start_supervisor(models=gemma(), default_model="gemma")
    system = "You are a careful assistant who answers in full sentences. " * 12
    prompts = [system + q for q in ("Name a river.", "Name a mountain.", "Name a city in Italy.")]
    with sup.client(timeout=120) as c:
        first = [c.complete(p, max_tokens=24, temperature=0, seed=5).text for p in prompts]
        reversed_order = [c.complete(p, max_tokens=24, temperature=0, seed=5).text for p in reversed(prompts)]
        c.complete("Something else entirely.", max_tokens=8, temperature=0.9)  # reuses the cache freely
        c.unload("gemma")
        fresh = [c.complete(p, max_tokens=24, temperature=0, seed=5).text for p in prompts[::2]]
    assert reversed_order[::-1] == first
    assert fresh == first[::2]


STORY = "List the days of the week, one per line, and say something about each:"


def test_stop_strings_reach_llama_through_the_supervisor(start_supervisor):
    sup = start_supervisor(models=gemma(), default_model="gemma")
    with sup.client() as c:
        full = c.complete(STORY, max_tokens=40, temperature=0, seed=1).text
        words = [w for w in full.split() if len(w) >= 4]
        assert len(words) >= 3, full
        stop = words[len(words) // 2]  # a word from the middle of the text
        cut = c.complete(STORY, max_tokens=40, temperature=0, seed=1, stop=[stop])
    assert cut.reason == "stop", (cut, stop)
    assert cut.text == full[: full.find(stop)], (cut.text, full, stop)


def test_sampling_keys_reach_llama(start_supervisor):
    """Each key, set so that it alone decides the text, gives the text it must: top_k 1, top_p 0
    and min_p 1 each leave only the likeliest token (greedy), whatever the seed and temperature;
    a strong repeat_penalty changes greedy text that repeats itself."""
    sup = start_supervisor(models=gemma(), default_model="gemma")
    with sup.client() as c:
        greedy = c.complete(STORY, max_tokens=24, temperature=0, seed=1).text
        sampled = [c.complete(STORY, max_tokens=24, temperature=1.5, seed=s).text for s in (1, 2, 3)]
        assert any(t != greedy for t in sampled), "temperature 1.5 should not give the greedy text three times"
        for keys in ({"top_k": 1}, {"top_p": 0.0}, {"min_p": 1.0}):
            for seed in (1, 2):
                got = c.complete(STORY, max_tokens=24, temperature=1.5, seed=seed, **keys).text
                assert got == greedy, (keys, seed, got, greedy)
        repetitive = "one two one two one two one two one two"
        plain = c.complete(repetitive, max_tokens=16, temperature=0, seed=1, repeat_penalty=1.0).text
        penalised = c.complete(repetitive, max_tokens=16, temperature=0, seed=1, repeat_penalty=3.0).text
        assert penalised != plain, plain
