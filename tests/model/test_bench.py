"""`stoker bench --quick` works end to end on the demo model (its numbers are not judged here)."""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]


def test_bench_quick_prints_every_measurement_and_target(short_dir):
    from tests.model.test_gemma import gemma

    cfg = short_dir / "c.toml"
    cfg.write_text('[supervisor]\ndefault_model = "gemma"\n' + gemma(2048))
    done = subprocess.run([sys.executable, "-m", "stoker.supervisor", "bench", "--quick", "--json",
                           "--config", str(cfg)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    values = data["values"]
    for key in ("decode_tps_stoker", "decode_tps_inprocess", "decode_ratio", "ttft_ms_stoker", "ttft_ms_inprocess",
                "cold_ms_stoker", "cold_ms_inprocess", "capacity_tokens_s", "relay_tokens_s", "requests_s",
                "supervisor_rss_mb", "worker_rss_mb", "inprocess_rss_mb"):
        assert values[key] > 0, key
    assert values["ttft_pairs"] == 2  # one run of 2 first-token requests per side, all paired
    assert len(data["targets"]) == 6 and data["model"] == "gemma"
    table = subprocess.run([sys.executable, "-m", "stoker.supervisor", "bench", "--quick", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=300)
    assert table.returncode == 0 and "decode tokens/s" in table.stdout and "targets:" in table.stdout


def test_bench_concurrency_quick_reports_each_client_count_and_the_shared_prefix(short_dir):
    from tests.model.test_gemma import gemma

    cfg = short_dir / "c.toml"
    cfg.write_text('[supervisor]\ndefault_model = "gemma"\n' + gemma(1024))
    done = subprocess.run([sys.executable, "-m", "stoker.supervisor", "bench", "--quick", "--json",
                           "--concurrency", "1,3", "--parallel", "3", "--tokens", "8", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["settings"]["parallel"] == 3 and data["one_stream_tps"] > 0
    assert [row["clients"] for row in data["levels"]] == [1, 3]
    for row in data["levels"]:
        for side in ("batched", "parallel_1"):
            assert row[f"{side}_x"] > 0 and 0 < row[f"{side}_first_ms_median"] <= row[f"{side}_first_ms_max"]
    shared = data["shared_prefix"]
    assert shared["cached_total_s"] > 0 and shared["uncached_total_s"] > 0
    bad = subprocess.run([sys.executable, "-m", "stoker.supervisor", "bench", "--concurrency", "1,x",
                          "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "client counts" in bad.stderr


def test_bench_http_quick_compares_the_gateway_with_the_zeromq_client(short_dir):
    pytest.importorskip("uvicorn", reason="the http extra is not installed")
    from tests.model.test_gemma import gemma

    cfg = short_dir / "c.toml"
    cfg.write_text('[supervisor]\ndefault_model = "gemma"\n' + gemma(1024))
    done = subprocess.run([sys.executable, "-m", "stoker.supervisor", "bench", "--quick", "--json", "--http",
                           "--config", str(cfg)], capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr
    res = json.loads(done.stdout)
    for key in ("ttft_ms_direct", "ttft_ms_http", "tokens_per_s_direct", "tokens_per_s_http",
                "requests_per_s_direct", "requests_per_s_http"):
        assert res[key] > 0, key
    assert res["tokens_per_s_ratio"] == round(res["tokens_per_s_http"] / res["tokens_per_s_direct"], 3)
