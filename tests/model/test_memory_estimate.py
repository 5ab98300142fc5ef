"""The GGUF memory estimate against what a real Gemma worker really holds."""

import pytest

from tests.model.test_gemma import gemma

pytestmark = pytest.mark.model


@pytest.mark.parametrize("n_ctx", [2048, 4096])
def test_gguf_estimate_of_gemma_is_within_25_percent_of_the_workers_rss(start_supervisor, n_ctx):
    sup = start_supervisor(models=gemma(n_ctx), default_model="gemma")
    with sup.client() as c:
        [row] = [r for r in c.models()["models"] if r["name"] == "gemma"]
        assert not row["memory_measured"]
        estimate = row["ram_bytes"]
        # Load it and use it the way it will be used: a short and a long prompt.
        c.complete("The capital of France is", max_tokens=32, temperature=0).text
        c.complete("word " * 1200, max_tokens=32, temperature=0).text
    [w] = sup.workers("gemma")
    rss = w["rss_bytes"]
    assert abs(estimate - rss) <= 0.25 * rss, (estimate / 2**20, rss / 2**20)
    # Measured, the real figure replaces the estimate in the budget.
    from tests.conftest import wait_for

    wait_for(lambda: sup.workers("gemma")[0]["measured"], 5, "a measurement")
    [w] = sup.workers("gemma")
    assert w["charged_ram_bytes"] >= rss * 0.9
    with sup.client() as c:
        [row] = [r for r in c.models()["models"] if r["name"] == "gemma"]
    assert row["memory_measured"] and row["ram_bytes"] == w["charged_ram_bytes"]
    print(f"n_ctx {n_ctx}: estimate {estimate / 2**20:.0f} MiB, worker RSS {rss / 2**20:.0f} MiB "
          f"({(estimate - rss) / rss:+.1%})")
