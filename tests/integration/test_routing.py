"""Requests reach warm workers of the right model, in a real supervisor with fake models."""

from stoker.protocol.client import End, Info, Token
from stoker.workers.fake_backend import complete

from .helpers import collect, raw_socket, send, text_of


def expected(prompt: str, n: int, seed: int = 0) -> str:
    return "".join(complete(prompt, seed, n)[0])


def test_generate_streams_the_fake_models_text(start_supervisor):
    sup = start_supervisor()
    with sup.client() as c:
        events = list(c.stream("hello world", model="echo", max_tokens=20, seed=4))
    tokens = [e for e in events if isinstance(e, Token)]
    end = events[-1]
    assert isinstance(end, End)
    assert "".join(t.text for t in tokens) == expected("hello world", 20, 4)
    assert end.usage["completion_tokens"] == sum(t.n for t in tokens)
    assert set(end.timings) == {"queued_ms", "load_ms", "ttft_ms", "total_ms"}
    states = [e.state for e in events if isinstance(e, Info)]
    assert states == ["loading", "running"]  # cold: lazily loaded on first request


def test_model_is_loaded_lazily_then_stays_warm(start_supervisor):
    sup = start_supervisor()
    assert sup.workers() == []
    with sup.client() as c:
        c.complete("a", model="echo", max_tokens=2).text
        [w] = sup.workers()
        events = list(c.stream("b", model="echo", max_tokens=2))
    assert [e.state for e in events if isinstance(e, Info)] == ["running"]
    assert events[-1].timings["load_ms"] == 0
    [w2] = sup.workers()
    assert (w2["pid"], w2["served"], w2["state"]) == (w["pid"], 2, "idle")


def test_default_model_is_used_when_none_is_named(start_supervisor):
    sup = start_supervisor()
    with sup.client() as c:
        assert c.complete("x", max_tokens=5).text == expected("x", 5)
    assert [w["model"] for w in sup.workers()] == ["echo"]


def test_pipelined_requests_on_one_socket_to_two_models(start_supervisor):
    sup = start_supervisor()
    sock = raw_socket(sup.endpoint)
    reqs = {f"r{i}": (f"prompt {i}", "echo" if i % 2 else "slow") for i in range(6)}
    for rid, (prompt, model) in reqs.items():
        send(sock, op="generate", id=rid, prompt=prompt, model=model, max_tokens=8)
    got = collect(sock, set(reqs))
    for rid, (prompt, model) in reqs.items():
        assert got[rid][-1]["ev"] == "end", got[rid][-1]
        assert text_of(got[rid]) == expected(prompt, 8)
    assert sorted(w["model"] for w in sup.workers()) == ["echo", "slow"]
    sock.close()


def test_chat_messages(start_supervisor):
    sup = start_supervisor()
    with sup.client() as c:
        text = c.complete(messages=[{"role": "user", "content": "hi"}], model="echo", max_tokens=6).text
    assert text == expected("<user>hi\n<assistant>", 6)


def test_max_tokens_is_capped_by_the_server_limit(start_supervisor):
    sup = start_supervisor(max_tokens_limit=7)
    tokens, reason = complete("capped", 0, 7)
    assert reason.value == "length"  # this prompt runs past 7 tokens when uncapped
    with sup.client() as c:
        events = list(c.stream("capped", model="echo", max_tokens=1000))
    assert "".join(e.text for e in events if isinstance(e, Token)) == "".join(tokens)
    assert (events[-1].reason, events[-1].usage["completion_tokens"]) == ("length", 7)


def test_load_and_unload_ops(start_supervisor):
    sup = start_supervisor()
    with sup.client() as c:
        assert c.load("echo") == {"model": "echo", "loaded": True}
        [w] = sup.workers()
        assert w["state"] == "idle" and w["rss_bytes"] > 0
        assert c.models()["models"][0]["loaded"] is True
        assert c.unload("echo") == {"model": "echo", "unloaded": True}
        assert sup.workers() == []
