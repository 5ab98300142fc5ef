"""Log-probability entries: the figures llama-cpp-python computes, the top alternatives without a
full sort, pieces of several tokens merged, and entries kept in step with stop-string holding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stoker.workers import logprobs
from stoker.workers.stops import StopHolder


@pytest.mark.parametrize("size", [7, 1000, 32000, 262144])
@pytest.mark.parametrize("n", [0, 1, 3, 20])
def test_top_ids_are_the_n_largest(size, n):
    x = np.random.default_rng(size + n).standard_normal(size).astype(np.float32)
    assert sorted(logprobs.top_ids(x, n)) == sorted(np.argsort(-x)[:n].tolist())


def test_entry_figures_are_llama_cpp_pythons():
    from llama_cpp import Llama

    logits = np.random.default_rng(3).standard_normal(50000).astype(np.float32) * 4
    theirs = Llama.logits_to_logprobs(logits)
    e = logprobs.of_logits(logits, 17, 5, lambda i: f"<{i}>".encode())
    assert e["logprob"] == float(theirs[17]) and e["token"] == "<17>" and e["bytes"] == list(b"<17>")
    best = np.argsort(-theirs)[:5]
    assert [t["token"] for t in e["top_logprobs"]] == [f"<{i}>" for i in best]
    assert [t["logprob"] for t in e["top_logprobs"]] == [float(theirs[i]) for i in best]


def test_a_piece_of_several_tokens_has_their_joint_logprob_and_the_first_ones_alternatives():
    first = logprobs.entry(b"\xc3", -0.5, [logprobs.alt(b"\xc3", -0.5)])
    second = logprobs.entry(b"\xa9", -0.25, [logprobs.alt(b"\xa9", -0.25)])
    assert first["token"] == "\ufffd"
    joined = logprobs.merged([first, second])
    assert joined["token"] == "é" and joined["bytes"] == [0xC3, 0xA9]
    assert math.isclose(joined["logprob"], -0.75) and joined["top_logprobs"] == first["top_logprobs"]
    assert logprobs.merged([first]) is first


def test_entries_go_with_the_tokens_a_stop_holder_lets_go():
    h = StopHolder(["END"])
    e = [logprobs.entry(t.encode(), -i, []) for i, t in enumerate(["a", " E", "N", "x", "E", "ND", "z"])]
    chunks, hit = h.push("a", e[0])
    assert [c.logprobs for c in chunks] == [[e[0]]] and not hit
    assert h.push(" E", e[1]) == ([], False)  # " E" may begin "END": held with its entry
    chunks, hit = h.push("N", e[2])
    assert chunks == [] and not hit
    chunks, hit = h.push("x", e[3])  # " ENx": not a stop after all
    assert chunks[0].text == " ENx" and chunks[0].n == 3 and chunks[0].logprobs == e[1:4]
    h.push("E", e[4])
    chunks, hit = h.push("ND", e[5])
    assert hit and chunks == [] and h.held_logprobs == []  # the stop's own tokens: no text, no entries
    assert StopHolder([]).push("q")[0][0].logprobs is None
