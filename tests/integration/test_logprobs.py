"""`logprobs: N` through a real supervisor and fake workers: an entry per token in every token
frame, deterministic, the same when the worker runs one request or four, kept across a worker
killed mid-stream, and refused when out of range."""

from __future__ import annotations

import math
import os
import signal

import pytest

from stoker.protocol.client import Client
from stoker.protocol.errors import BadRequest

from .helpers import raw_socket, recv, send, text_of
from .test_constrained import ONE
from .test_parallel import PAR, msgs, read_all


def _check(text: str, usage_tokens: int, entries: list[dict], n: int) -> None:
    assert len(entries) == usage_tokens
    assert "".join(e["token"] for e in entries) == text
    for e in entries:
        assert bytes(e["bytes"]) == e["token"].encode()
        assert e["logprob"] <= 0
        assert len(e["top_logprobs"]) == n
        if n:
            assert e["top_logprobs"][0]["token"] == e["token"]  # the fake model is greedy: its choice is the top
            lps = [t["logprob"] for t in e["top_logprobs"]]
            assert lps == sorted(lps, reverse=True)
            assert sum(math.exp(x) for x in lps) <= 1 + 1e-9


@pytest.mark.parametrize("model", ["one", "par"])
def test_each_token_has_its_logprob_and_alternatives(start_supervisor, model):
    sup = start_supervisor(models=PAR + ONE, default_model=model)
    with Client(sup.endpoint, timeout=30) as c:
        streams = [c.generate(f"score {i}", max_tokens=12, logprobs=3, seed=i) for i in range(3)]
        plain = c.generate("score 0", max_tokens=12, seed=0)
        zero = c.generate("score 0", max_tokens=12, seed=0, logprobs=0)
        stopped = c.generate("score 0", max_tokens=12, seed=0, logprobs=2, stop=[" s"])
        done = [s.complete() for s in streams]
        plain_done, zero_done, stop_done = plain.complete(), zero.complete(), stopped.complete()
    for comp in done:
        _check(comp.text, comp.usage["completion_tokens"], comp.logprobs, 3)
    assert plain_done.logprobs is None and plain_done.text == done[0].text
    _check(zero_done.text, zero_done.usage["completion_tokens"], zero_done.logprobs, 0)
    assert [e["logprob"] for e in zero_done.logprobs] == [e["logprob"] for e in done[0].logprobs]
    assert stop_done.text and not stop_done.text.endswith(" s")
    assert stop_done.logprobs == [{**e, "top_logprobs": e["top_logprobs"][:2]}
                                  for e in done[0].logprobs[: len(stop_done.logprobs)]]
    assert stop_done.usage["completion_tokens"] == len(stop_done.logprobs)


def test_logprobs_are_deterministic_and_survive_a_killed_worker(start_supervisor):
    sup = start_supervisor(models=PAR, default_model="par")
    with Client(sup.endpoint, timeout=30) as c:
        whole = c.complete("rank me", max_tokens=40, logprobs=2, seed=5)
    sock = raw_socket(sup.endpoint)
    send(sock, op="generate", id="k", prompt="rank me", max_tokens=40, logprobs=2, seed=5)
    seen = []
    while sum(r.get("n", 0) for r in seen if r["ev"] == "token") < 5:
        seen.append(recv(sock))
    [w] = sup.workers("par")
    os.kill(w["pid"], signal.SIGKILL)
    replies = seen + msgs(read_all({sock: ["k"]})["k"])
    sock.close()
    assert replies[-1]["ev"] == "end"
    assert text_of(replies) == whole.text
    entries = [e for r in replies if r["ev"] == "token" for e in r["logprobs"]]
    assert entries == whole.logprobs


def test_logprobs_out_of_range_is_a_bad_request(start_supervisor):
    sup = start_supervisor(models=PAR, default_model="par")
    with Client(sup.endpoint, timeout=30) as c:
        for bad in [-1, 21, 1.5, True, "3"]:
            with pytest.raises(BadRequest, match="'logprobs' must be an integer from 0 to 20"):
                c.complete("x", logprobs=bad)
        assert len(c.complete("x", logprobs=20, max_tokens=2).logprobs[0]["top_logprobs"]) == 20
