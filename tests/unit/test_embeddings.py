"""Embed jobs on their own: the worker's Embedder (batches across jobs within its capacity,
refuses or cuts long inputs, cancels) and an embed's life in the supervisor's Requests (the
vectors of a dead worker's job kept, only the rest sent again, the result in input order)."""

from __future__ import annotations

import pytest

from stoker.protocol.errors import BadRequest
from stoker.protocol.messages import Op, Reason
from stoker.protocol.validation import EmbedRequest
from stoker.supervisor.config import ModelConfig
from stoker.supervisor.requests import Requests, RunOnWorker
from stoker.workers.embeddings import FakeEmbedder, Vectors

from .test_requests import C, replies


def embedder(ctx: int = 10) -> FakeEmbedder:
    return FakeEmbedder(ModelConfig(name="e", backend="fake", embedding=True, embedding_ctx=ctx, embedding_dim=8))


def test_a_step_fills_its_batch_across_jobs_in_order_and_ends_each_job_once_done():
    e = embedder(ctx=10)
    e.admit(1, ["a b c", "d e f"], True, False)  # 6 tokens
    e.admit(2, ["g h", "i j k l", "m"], True, False)  # 7 tokens
    out = e.step()  # 10 tokens: job 1 whole, job 2's first input; its second (4) does not fit
    assert [(type(o).__name__, o.rid) for o in out] == [("Vectors", 1), ("Emitted", 1), ("Vectors", 2)]
    assert out[0].start == 0 and len(out[0].vectors) == 2 and out[0].tokens == 6
    assert out[1].reason is Reason.STOP and out[1].prompt_tokens == 6
    out = e.step()
    assert isinstance(out[0], Vectors) and out[0].start == 1 and len(out[0].vectors) == 2
    assert out[1].reason is Reason.STOP and out[1].prompt_tokens == 7 and not e.running


def test_long_inputs_are_refused_or_cut_and_a_refused_job_keeps_nothing():
    e = embedder(ctx=4)
    with pytest.raises(BadRequest, match=r"input\[1\] is 5 tokens.*at most 4 tokens.*truncate"):
        e.admit(1, ["ok", "one two three four five"], True, False)
    assert not e.running
    e.admit(2, ["one two three four five"], False, True)
    [vectors, end] = e.step()
    assert vectors.tokens == 4 and end.prompt_tokens == 4
    assert e.step() == [] and not e.running


def test_cancel_ends_a_job_at_the_next_step_with_what_it_had_done():
    e = embedder(ctx=2)
    e.admit(1, ["a", "b", "c"], True, False)
    e.step()
    e.cancel(1)
    e.cancel(99)  # unknown: nothing
    [end] = e.step()
    assert end.reason is Reason.CANCELLED and end.prompt_tokens == 2 and not e.running


def test_vectors_are_unit_length_unless_asked_not_to_be():
    e = embedder()
    e.admit(1, ["coal coal coal"], True, False)
    e.admit(2, ["coal coal coal"], False, False)
    out = e.step()
    unit, raw = out[0].vectors[0], out[2].vectors[0]
    assert sum(x * x for x in unit) == pytest.approx(1.0) and sum(abs(x) for x in raw) == pytest.approx(3.0)


def test_an_embed_whose_worker_died_sends_only_the_inputs_left_and_answers_in_order():
    rs = Requests("i")
    req = rs.accept(C, EmbedRequest(op=Op.EMBED, id="e", inputs=("a", "b", "c", "d")), "m", 0, 0.0)
    [info, run] = rs.dispatched(req.key, "w1", 0.1, 0.0)
    assert isinstance(run, RunOnWorker) and run.embed and run.body["input"] == ["a", "b", "c", "d"]
    rs.vectors(req, 0, [[1.0], [2.0]], 5, 0.2)
    rs.worker_exited("w1", 0.3)
    [run] = rs.dispatched(req.key, "w2", 0.4, 0.0)
    assert run.body["input"] == ["c", "d"] and run.body["normalize"] is True
    rs.vectors(req, 1, [[4.0]], 1, 0.5)  # "d" first: vectors may come in any batch order
    rs.vectors(req, 0, [[3.0]], 2, 0.5)
    [result] = replies(rs.ended(req, Reason.STOP, 0, 0.6))
    assert result["ev"] == "result" and result["data"]["embeddings"] == [[1.0], [2.0], [3.0], [4.0]]
    assert result["data"]["usage"] == {"prompt_tokens": 8} and result["data"]["model"] == "m"


def test_an_embed_ended_short_of_its_vectors_is_an_internal_error():
    rs = Requests("i")
    req = rs.accept(C, EmbedRequest(op=Op.EMBED, id="e", inputs=("a", "b")), "m", 0, 0.0)
    rs.dispatched(req.key, "w1", 0.1, 0.0)
    rs.vectors(req, 0, [[1.0]], 1, 0.2)
    [error] = replies(rs.ended(req, Reason.STOP, 0, 0.3))
    assert error["ev"] == "error" and error["code"] == "internal" and "1 of 2 vectors" in error["message"]
