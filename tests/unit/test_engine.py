"""Engines in-process: several requests stepped together (fake backend), and the one-at-a-time
engine any backend gets."""

from __future__ import annotations

import time

import pytest

from stoker.protocol.errors import BadRequest, Internal
from stoker.protocol.messages import ErrorCode, Reason
from stoker.supervisor.config import ModelConfig
from stoker.workers.backend import Backend, Chunk, Generation, GenerationRequest
from stoker.workers.engine import GenerationEngine
from stoker.workers.fake_backend import FakeBackend, FakeEngine, complete


def req(prompt: str, max_tokens: int = 10, **sampling) -> GenerationRequest:
    return GenerationRequest(prompt, None, max_tokens, sampling)


def run(engine, steps: int = 10_000) -> dict:
    """Step until nothing runs: rid -> (text, final Emitted, steps it took)."""
    texts: dict = {}
    finals: dict = {}
    for n in range(steps):
        if not engine.running:
            break
        for out in engine.step():
            if out.chunk is not None:
                texts[out.rid] = texts.get(out.rid, "") + out.chunk.text
            if out.final:
                finals[out.rid] = (out, n)
    return {rid: (texts.get(rid, ""), finals[rid][0], finals[rid][1]) for rid in finals}


def test_each_sequence_gets_the_text_it_gets_alone_whatever_shares_its_steps():
    model = ModelConfig(name="f", backend="fake", end_every=0)
    together = FakeEngine(model, 4)
    for rid in range(4):
        together.admit(rid, req(f"prompt {rid}", max_tokens=5 + 3 * rid))
    done = run(together)
    for rid in range(4):
        text, end, steps = done[rid]
        assert text == "".join(complete(f"prompt {rid}", 0, 5 + 3 * rid, 0)[0])
        assert end.reason is Reason.LENGTH and end.completion_tokens == 5 + 3 * rid
        assert steps == 5 + 3 * rid - 1  # one token per step each: they ran side by side


def test_a_request_joins_at_the_next_step_and_a_cancel_ends_only_its_own():
    engine = FakeEngine(ModelConfig(name="f", backend="fake", end_every=0), 4)
    engine.admit(1, req("one", max_tokens=50))
    engine.step()
    engine.admit(2, req("two", max_tokens=3))
    out = engine.step()
    assert [o.rid for o in out if o.chunk] == [1, 2]
    two = out[1].chunk.text
    engine.cancel(1)
    engine.cancel(99)  # unknown: nothing
    out = engine.step()
    [end] = [o for o in out if o.final]
    assert end.rid == 1 and end.reason is Reason.CANCELLED and end.completion_tokens == 2
    assert engine.running == 1
    two += "".join(o.chunk.text for o in out if o.rid == 2 and o.chunk)
    assert two + run(engine)[2][0] == "".join(complete("two", 0, 3, 0)[0])


def test_a_full_engine_refuses_and_a_request_for_nothing_ends_at_its_first_step():
    engine = FakeEngine(ModelConfig(name="f", backend="fake"), 2)
    engine.admit(1, req("x", max_tokens=0))
    engine.admit(2, req("y"))
    with pytest.raises(Internal):
        engine.admit(3, req("z"))
    ends = [o for o in engine.step() if o.final]
    assert ends[0].rid == 1 and ends[0].reason is Reason.LENGTH and ends[0].completion_tokens == 0


def test_a_step_costs_more_with_more_sequences_but_far_less_than_one_step_each():
    model = ModelConfig(name="f", backend="fake", end_every=0, tokens_per_second=100, batch_cost=0.5)

    def seconds_per_step(n: int) -> float:
        engine = FakeEngine(model, 4)
        for rid in range(n):
            engine.admit(rid, req(str(rid), max_tokens=10))
        started = time.monotonic()
        run(engine)
        return (time.monotonic() - started) / 10

    one, three = seconds_per_step(1), seconds_per_step(3)
    assert 0.009 < one < 0.018 and 0.019 < three < 0.035, (one, three)  # 10 ms, then 10 x (1 + 0.5 x 2)


class Flaky(Backend):
    """Generations of fixed chunks; the one for prompt "boom" raises after its first chunk."""

    def load(self) -> None:
        pass

    def generate(self, request: GenerationRequest) -> Generation:
        if request.prompt == "refuse":
            raise BadRequest("no such thing")
        prompt = request.prompt

        class G(Generation):
            def chunks(self):
                for i in range(3):
                    if prompt == "boom" and i == 1:
                        raise RuntimeError("a bug")
                    self.completion_tokens += 1
                    yield Chunk(f"{prompt}{i} ")
                self.reason = Reason.LENGTH

        return G()


def test_the_turn_taking_engine_fails_one_request_and_goes_on_with_the_others():
    engine = Flaky().engine(2, lambda: None)
    assert isinstance(engine, GenerationEngine)
    with pytest.raises(BadRequest):
        engine.admit(9, req("refuse"))
    assert engine.running == 0
    engine.admit(1, req("ok"))
    engine.admit(2, req("boom"))
    done = run(engine)
    assert done[1][0] == "ok0 ok1 ok2 " and done[1][1].reason is Reason.LENGTH
    assert done[2][0] == "boom0 " and done[2][1].error[0] is ErrorCode.INTERNAL and "a bug" in done[2][1].error[1]


def test_the_fake_backend_batches_and_a_paced_generation_alone_is_unchanged():
    backend = FakeBackend(ModelConfig(name="f", backend="fake"))
    assert isinstance(backend.engine(4, lambda: None), FakeEngine)
    gen = backend.generate(req("same text", max_tokens=12))
    assert "".join(c.text for c in gen.chunks()) == "".join(complete("same text", 0, 12)[0])


def test_a_cancel_counts_only_the_tokens_whose_text_was_sent():
    engine = FakeEngine(ModelConfig(name="f", backend="fake", end_every=0), 2)
    # A token ending in "s" may begin this stop string (which never comes): it is held back.
    engine.admit(1, req("held", max_tokens=60, stop=["s\x00"]))
    sent = 0
    while not engine._seqs[1].stops.held:
        sent += sum(o.chunk.n for o in engine.step() if o.chunk)
    engine.cancel(1)
    [end] = [o for o in engine.step() if o.final]
    assert end.reason is Reason.CANCELLED and end.completion_tokens == sent
