from hypothesis import given, settings
from hypothesis import strategies as st

from stoker.protocol.messages import Reason
from stoker.supervisor.config import ModelConfig
from stoker.workers.backend import GenerationRequest
from stoker.workers.fake_backend import FakeBackend, complete


def run(prompt, max_tokens=30, **sampling):
    backend = FakeBackend(ModelConfig(name="f", backend="fake"))
    gen = backend.generate(GenerationRequest(prompt, None, max_tokens, sampling))
    chunks = list(gen.chunks())
    return "".join(c.text for c in chunks), chunks, gen


def test_same_request_same_text_and_seed_changes_it():
    assert run("hello")[0] == run("hello")[0]
    assert run("hello", seed=1)[0] != run("hello", seed=2)[0]


def test_stops_at_max_tokens():
    text, chunks, gen = run("a long prompt", max_tokens=5)
    tokens, reason = complete("a long prompt", 0, 5)
    assert text == "".join(tokens)
    assert gen.completion_tokens == sum(c.n for c in chunks) == len(tokens)
    assert gen.reason is reason


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=40), st.integers(0, 2**32 - 1), st.integers(1, 60))
def test_resuming_from_prompt_plus_partial_completion_continues_exactly(prompt, seed, cut):
    full, reason = complete(prompt, seed, 80)
    cut = min(cut, len(full))
    rest, _ = complete(prompt + "".join(full[:cut]), seed, 80 - cut)
    assert full[:cut] + rest == full


def test_natural_end_happens():
    reasons = {complete(f"p{i}", 0, 400)[1] for i in range(20)}
    assert Reason.STOP in reasons


def test_stop_strings_end_the_text_before_them():
    full = "".join(complete("stop test", 0, 60)[0])
    stop = full[20:26]
    text, chunks, gen = run("stop test", max_tokens=60, stop=[stop])
    assert text == full[: full.index(stop)]
    assert gen.reason is Reason.STOP
    assert gen.completion_tokens == sum(c.n for c in chunks)


def test_a_stop_string_at_the_very_start_sends_nothing_and_counts_nothing():
    first = complete("stop test", 0, 1)[0][0]
    text, chunks, gen = run("stop test", max_tokens=60, stop=[first])
    assert (text, chunks, gen.completion_tokens, gen.reason) == ("", [], 0, Reason.STOP)


def test_chat_messages_are_rendered():
    backend = FakeBackend(ModelConfig(name="f", backend="fake"))
    gen = backend.generate(GenerationRequest(None, [{"role": "user", "content": "hi"}], 5, {}))
    assert "".join(c.text for c in gen.chunks()) == "".join(complete("<user>hi\n<assistant>", 0, 5)[0])


def test_end_every_zero_never_ends_by_itself():
    tokens, reason = complete("endless", 0, 3000, end_every=0)
    assert (len(tokens), reason) == (3000, Reason.LENGTH)


def test_fake_logprobs_put_the_chosen_token_first_and_most_likely():
    import math

    from stoker.workers.fake_backend import WORDS, logprob_entry

    for state in range(2000):
        entry = logprob_entry(state, WORDS[state % len(WORDS)], 5)
        probs = [t["logprob"] for t in entry["top_logprobs"]]
        assert entry["top_logprobs"][0]["token"] == entry["token"] and probs == sorted(probs, reverse=True)
        assert probs[0] > probs[1] and math.fsum(math.exp(p) for p in probs) <= 1.0 + 1e-9
