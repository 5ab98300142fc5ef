"""Sizes, budgets and the GGUF memory estimate (on files written with the gguf package, and the demo model)."""

from pathlib import Path

import numpy as np
import pytest

from stoker.supervisor.config import ConfigError, ModelConfig, resolve_config
from stoker.supervisor.memory import Budget, Cost, GgufError, estimate, estimate_gguf, gguf_facts, gpu_share
from stoker.supervisor.sizes import AUTO, format_size, parse_size
from stoker.workers.demo_model import demo_available, demo_path

MiB = 1024 * 1024


@pytest.mark.parametrize("text, size", [
    (1234, 1234), ("1234", 1234), ("8GiB", 8 * 1024**3), ("512MB", 512_000_000), ("1.5 GiB", 3 * 1024**3 // 2),
    ("64 KiB", 65536), ("2g", 2_000_000_000), ("auto", AUTO), ("0", 0),
])
def test_sizes_parse(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "lots", "8 GiBs", "-5MB", -7, True, "1e9", [1]])
def test_bad_sizes_say_what_is_accepted(bad):
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


def test_format_size():
    assert format_size(300 * MiB) == "300 MiB" and format_size(3 * MiB // 2) == "1.5 MiB" and format_size(12) == "12 B"


def test_budget_config_keys(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[supervisor]\nram_budget = "6GiB"\nvram_budget = 0\nload_wait = 5\n'
                   '[models.m]\nbackend = "fake"\nmemory_bytes = "300MiB"\nreplicas = 2\nidle_timeout = 9\n')
    c = resolve_config(cfg, environ={})
    assert c.supervisor.ram_budget == 6 * 1024**3 and c.supervisor.vram_budget == 0
    assert c.models["m"].memory_bytes == 300 * MiB and c.models["m"].replicas == 2
    assert resolve_config(cfg, environ={"STOKER_RAM_BUDGET": "1GB"}).supervisor.ram_budget == 10**9
    assert resolve_config(None, environ={"STOKER_CONFIG": str(cfg)}).supervisor.ram_margin == 0.1


@pytest.mark.parametrize("table, words", [
    ('[supervisor]\nram_budget = "8 bananas"', "ram_budget"),
    ('[supervisor]\nram_margin = 1.5', "ram_margin"),
    ('[supervisor]\nload_wait = -1', "load_wait"),
    ('[models.m]\nbackend = "fake"\nreplicas = 0', "replicas"),
    ('[models.m]\nbackend = "fake"\nmemory_bytes = "auto"', "memory_bytes"),
])
def test_bad_budget_config_names_the_key(tmp_path, table, words):
    cfg = tmp_path / "c.toml"
    cfg.write_text(table + "\n")
    with pytest.raises(ConfigError, match=words):
        resolve_config(cfg, environ={})


def test_budget_fits_and_over():
    b = Budget(ram=100, vram=None)
    assert b.fits(Cost(100, 10**12)) and not b.fits(Cost(101, 0))
    assert b.over(Cost(130, 5)) == Cost(30, 0)
    assert Budget().fits(Cost(10**15, 10**15))


def write_gguf(path: Path, n_layer: int = 4, n_embd: int = 64, n_head: int = 4, n_head_kv: int = 2,
               vocab: int = 1000) -> int:
    """A small llama-architecture GGUF; returns the bytes of its tensors."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_embedding_length(n_embd)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_context_length(2048)
    w.add_token_list([f"t{i}" for i in range(vocab)])
    total = 0
    for i in range(n_layer):
        t = np.zeros((n_embd, n_embd), dtype=np.float32)
        w.add_tensor(f"blk.{i}.attn_q.weight", t)
        total += t.nbytes
    emb = np.zeros((vocab, n_embd), dtype=np.float16)
    w.add_tensor("token_embd.weight", emb)
    total += emb.nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return total


def test_gguf_facts_from_a_written_file(tmp_path):
    path = tmp_path / "tiny.gguf"
    weights = write_gguf(path)
    f = gguf_facts(str(path))
    assert (f.architecture, f.weights_bytes, f.n_layer, f.n_embd, f.n_head, f.n_vocab) == ("llama", weights, 4, 64, 4, 1000)
    # K and V, 2 kv heads of 64/4 = 16 dims, in 4 layers
    assert f.kv_per_token == 4 * 2 * (16 + 16)


def test_estimate_adds_cache_compute_and_overhead_and_splits_by_gpu_layers(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    f = gguf_facts(str(path))
    cpu = estimate_gguf(f, n_ctx=1024, n_gpu_layers=0, overhead=10 * MiB)
    kv = 1024 * f.kv_per_token * 2
    assert cpu.vram == 0 and cpu.ram > f.weights_bytes + kv + 10 * MiB
    gpu = estimate_gguf(f, n_ctx=1024, n_gpu_layers=-1, overhead=10 * MiB)
    assert gpu.ram == 10 * MiB and gpu.vram == cpu.ram - 10 * MiB  # everything moved but the process
    half = estimate_gguf(f, n_ctx=1024, n_gpu_layers=2, overhead=10 * MiB)
    assert 0 < half.vram < gpu.vram and gpu_share(2, 4) == 2 / 5
    assert estimate_gguf(f, n_ctx=4096, n_gpu_layers=0, overhead=0).ram > cpu.ram  # a longer context costs more


def test_estimate_of_a_configured_size_wins(tmp_path):
    m = ModelConfig(name="m", backend="fake", memory_bytes=300 * MiB)
    assert estimate(m, None, overhead=5) == Cost(300 * MiB + 5)
    assert estimate(ModelConfig(name="f", backend="fake"), None).ram > 0  # the process itself
    # a llama model whose header cannot be read counts its file and its process
    llama = ModelConfig(name="l", backend="llama", path="/x.gguf")
    assert estimate(llama, None, overhead=5, file_bytes=100) == Cost(105)


@pytest.mark.parametrize("content", [b"", b"not a gguf at all", b"GGUF\x03\x00\x00\x00\x05"])
def test_unreadable_files_raise_gguf_error(tmp_path, content):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GgufError):
        gguf_facts(str(path))


def header(*kvs: bytes, n_kv: int | None = None) -> bytes:
    import struct

    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs) if n_kv is None else n_kv) + b"".join(kvs)


def kv(key: str, kind: int, payload: bytes) -> bytes:
    import struct

    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + payload


@pytest.mark.parametrize("name, data", [
    ("string array longer than the file", header(kv("a", 9, bytes.fromhex("08000000") + (10**6).to_bytes(8, "little")))),
    ("arrays nested 10,000 deep", header(kv("a", 9, (bytes.fromhex("09000000") + (1).to_bytes(8, "little")) * 10_000))),
    ("a number array of 2**62 entries", header(kv("a", 9, bytes.fromhex("04000000") + (2**62).to_bytes(8, "little")))),
    ("block_count is a string", header(kv("general.architecture", 8, (5).to_bytes(8, "little") + b"llama"),
                                       kv("llama.block_count", 8, (4).to_bytes(8, "little") + b"many"),
                                       kv("llama.embedding_length", 4, (64).to_bytes(4, "little")),
                                       kv("llama.attention.head_count", 4, (4).to_bytes(4, "little")))),
    ("2**64-1 key/values promised", header(n_kv=2**64 - 1)),
])
def test_hostile_headers_give_one_clear_error_quickly(tmp_path, name, data):
    import time

    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    t0 = time.monotonic()
    with pytest.raises(GgufError):
        gguf_facts(str(path))
    assert time.monotonic() - t0 < 1.0, name


def test_truncated_real_header_raises(tmp_path):
    path = tmp_path / "cut.gguf"
    write_gguf(path)
    data = path.read_bytes()
    path.write_bytes(data[:200])
    with pytest.raises(GgufError, match="truncated"):
        gguf_facts(str(path))


@pytest.mark.skipif(not demo_available(), reason="demo model package not installed")
def test_demo_gemma_facts_match_its_metadata():
    from stoker.workers.demo_model import ensure_demo_file

    ensure_demo_file()
    f = gguf_facts(str(demo_path()))
    assert (f.architecture, f.n_layer, f.n_embd, f.n_head, f.n_vocab) == ("gemma3", 18, 640, 4, 262144)
    # llama.cpp prints 235.16 MiB of weights and a 72 MiB f16 cache at n_ctx 4096
    assert round(f.weights_bytes / MiB, 2) == 235.16
    assert 4096 * f.kv_per_token * 2 == 72 * MiB


def test_without_nvml_vram_is_not_budgeted_and_nothing_fails():
    """pynvml failing to initialise (no driver, no library) is not an error: VRAM budgeting is off."""
    import pynvml

    from stoker.supervisor.config import SupervisorConfig
    from stoker.supervisor.resources import VramProbe, resolve_budget

    real_init = pynvml.nvmlInit

    def no_driver() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    pynvml.nvmlInit = no_driver
    try:
        probe = VramProbe()
    finally:
        pynvml.nvmlInit = real_init
    assert not probe.available and probe.usage() == {} and probe.free_bytes() == []
    budget = resolve_budget(SupervisorConfig(), probe)
    assert budget.vram is None and budget.ram > 0
    # A configured vram_budget still applies (to one GPU's worth).
    from dataclasses import replace

    assert resolve_budget(replace(SupervisorConfig(), vram_budget=5), probe).vram == 5


def test_a_model_with_parallel_sequences_counts_a_cache_for_each(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    f = gguf_facts(str(path))
    one = estimate(ModelConfig(name="l", backend="llama", path=str(path), n_ctx=1024), f, overhead=0)
    four = estimate(ModelConfig(name="l", backend="llama", path=str(path), n_ctx=1024, parallel=4), f, overhead=0)
    assert four.ram - one.ram >= 3 * 1024 * f.kv_per_token * 2  # three more caches of 1,024 tokens
    assert four == estimate_gguf(f, n_ctx=4096, n_gpu_layers=0, overhead=0)
    cached = ModelConfig(name="l", backend="llama", path=str(path), n_ctx=1024, parallel=4, prefix_cache=512)
    assert estimate(cached, f, overhead=0) == estimate_gguf(f, n_ctx=4096 + 512, n_gpu_layers=0, overhead=0)
