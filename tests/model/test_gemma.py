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
    [w] = sup.workers("gemma")
    assert w["served"] == 2


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
