"""Log-probabilities on the real Gemma: the values stoker streams for a greedy request are exactly
llama-cpp-python's own for the same request in-process (`create_completion(logprobs=N)`, which
needs `logits_all=True`), one request at a time (Llama's own stream) and in the batch engine."""

from __future__ import annotations

import pytest

from .test_gemma import gemma

pytestmark = pytest.mark.model

PROMPTS = ["The three primary colors are", "Question: What is the capital of Japan?\nAnswer:",
           "Translate to French: good morning ->"]
N_TOKENS, N_TOP = 12, 3


@pytest.fixture(scope="module")
def reference() -> dict[str, dict]:
    """llama-cpp-python's own logprobs for each prompt, greedy, in this process."""
    from llama_cpp import Llama

    from stoker.workers.demo_model import ensure_demo_file

    llm = Llama(model_path=str(ensure_demo_file()), n_ctx=1024, logits_all=True, verbose=False)
    out = {}
    for p in PROMPTS:
        # Each prompt from an empty cache: Llama reuses the cached prefix of the previous prompt
        # otherwise, and its figures then depend on what ran before (by up to 0.06 here);
        # stoker's do not (fixed-block prompt evaluation), and equal these.
        llm.reset()
        choice = llm.create_completion(p, max_tokens=N_TOKENS, temperature=0, logprobs=N_TOP)["choices"][0]
        out[p] = {"text": choice["text"], **choice["logprobs"]}
    llm.close()
    return out


@pytest.mark.parametrize("parallel", [1, 4])
def test_logprobs_equal_llama_cpp_pythons_own(start_supervisor, reference, parallel):
    sup = start_supervisor(models=gemma(1024) + f"parallel = {parallel}\n", default_model="gemma")
    with sup.client(timeout=120) as c:
        for p in PROMPTS:  # one at a time: a batch of several could round the logits otherwise
            ref = reference[p]
            got = c.complete(p, max_tokens=N_TOKENS, temperature=0, logprobs=N_TOP)
            assert got.text == ref["text"]
            assert [e["token"] for e in got.logprobs] == ref["tokens"]
            assert [e["logprob"] for e in got.logprobs] == [float(x) for x in ref["token_logprobs"]]
            for e, top in zip(got.logprobs, ref["top_logprobs"]):
                # The reference's map also holds the chosen token: here always among the top 3.
                assert {t["token"]: t["logprob"] for t in e["top_logprobs"]} == {k: float(v) for k, v in top.items()}
                assert [t["logprob"] for t in e["top_logprobs"]] == sorted(top.values(), reverse=True)
