"""GPU offload (n_gpu_layers) and VRAM figures. Skipped cleanly on machines without an NVIDIA GPU."""

import pytest

from stoker.supervisor.resources import VramProbe

pytestmark = [pytest.mark.model, pytest.mark.gpu]


def gpu_ready() -> bool:
    try:
        import llama_cpp

        return VramProbe().available and bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:
        return False


@pytest.mark.skipif(not gpu_ready(), reason="needs an NVIDIA GPU and a CUDA build of llama-cpp-python")
def test_offloaded_model_reports_its_vram(start_supervisor):
    from stoker.workers.demo_model import ensure_demo_file

    models = f'[models.gemma]\nbackend = "llama"\npath = "{ensure_demo_file()}"\nn_gpu_layers = -1\n'
    sup = start_supervisor(models=models, default_model="gemma")
    with sup.client() as c:
        assert c.complete("The capital of France is", max_tokens=8, temperature=0).text.strip()
    status = sup.status()
    assert status["supervisor"]["gpu"] is True
    [w] = status["workers"]
    assert w["vram_bytes"] > 100 * 2**20
    # VRAM is budgeted from NVML: the budget is what was free at start, less the margin.
    vram = status["memory"]["vram"]
    assert vram["budget"] > 0 and vram["used"] >= w["vram_bytes"] * 0.5

