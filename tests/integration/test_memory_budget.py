"""Memory budgets with real worker processes: the fake backend really holds its `memory_bytes`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from stoker.protocol.errors import InsufficientMemory
from tests.conftest import wait_for

MiB = 1024 * 1024
MODEL_BYTES = 160 * MiB
# Each worker is ~160 MiB of model plus ~40 MiB of process; two fit, three do not.
BUDGET = 520 * MiB

THREE = "\n".join(
    f'[models.{name}]\nbackend = "fake"\nmemory_bytes = {MODEL_BYTES}\ntokens_per_second = {tps}\nend_every = 0\n'
    for name, tps in (("a", 200), ("b", 200), ("c", 200))
)


def loaded(sup) -> set[str]:
    return {w["model"] for w in sup.status()["workers"] if w["state"] != "stopping"}


def check_budget(sup, seen: list) -> dict:
    """Status at one step: what the budget counts, and what the workers really hold, stay within it."""
    st = sup.status()
    mem = st["memory"]["ram"]
    assert mem["budget"] == BUDGET
    assert mem["used"] <= BUDGET, st
    real = sum(w["rss_bytes"] for w in st["workers"])
    assert real <= BUDGET, st
    seen.append((mem["used"], real, sorted(w["model"] for w in st["workers"])))
    return st


def test_three_models_in_a_budget_for_two_evict_the_lru_idle_one_never_a_busy_one(start_supervisor):
    sup = start_supervisor(THREE, ram_budget=BUDGET)
    seen: list = []
    stop = threading.Event()

    def watch() -> None:  # status at every step, not only between them
        while not stop.is_set():
            check_budget(sup, seen)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with sup.client() as c:
            for model in ("a", "b"):
                assert c.complete(model=model, prompt="x", max_tokens=3).text
            assert loaded(sup) == {"a", "b"}
            # Measured, the workers really hold their model.
            wait_for(lambda: all(w["measured"] for w in sup.status()["workers"]), 10, "measurements")
            for w in sup.status()["workers"]:
                assert w["rss_bytes"] > MODEL_BYTES
            # Alternating a, b, c, a, b, c: each new one evicts the least recently used idle one.
            order = []
            for model in ("c", "a", "b", "c"):
                assert c.complete(model=model, prompt="x", max_tokens=3).text
                order.append(sorted(loaded(sup)))
            assert order == [["b", "c"], ["a", "c"], ["a", "b"], ["b", "c"]]
            assert "to make room for 'c'" in sup.log()

            # Busy b streams; c is idle; a request for a evicts c, not b.
            with sup.client() as busy:
                stream = busy.stream(model="b", prompt="long", max_tokens=400)
                next(e for e in stream if type(e).__name__ == "Token")
                assert c.complete(model="a", prompt="x", max_tokens=3).text
                assert loaded(sup) == {"a", "b"}
                states = {w["model"]: w["state"] for w in sup.status()["workers"]}
                assert states["b"] == "busy"
                for _ in stream:
                    pass
    finally:
        stop.set()
        watcher.join(5)
    assert len(seen) > 20 and max(real for _, real, _ in seen) <= BUDGET
    print(f"{len(seen)} status snapshots; budget {BUDGET >> 20} MiB; most counted "
          f"{max(u for u, _, _ in seen) >> 20} MiB; most really held {max(r for _, r, _ in seen) >> 20} MiB; "
          f"most workers at once {max(len(m) for _, _, m in seen)}")


def test_requests_wait_for_busy_workers_then_fail_with_insufficient_memory(start_supervisor):
    sup = start_supervisor(THREE, ram_budget=BUDGET, load_wait=2)
    with sup.client() as c1, sup.client() as c2, sup.client() as c3:
        s1 = c1.stream(model="a", prompt="x", max_tokens=10_000)
        s2 = c2.stream(model="b", prompt="y", max_tokens=10_000)
        next(e for e in s1 if type(e).__name__ == "Token")
        next(e for e in s2 if type(e).__name__ == "Token")
        t0 = time.monotonic()
        with pytest.raises(InsufficientMemory) as err:
            c3.complete(model="c", prompt="z", max_tokens=3).text
        waited = time.monotonic() - t0
        assert 1.8 < waited < 5, waited
        assert "'a' (busy" in err.value.message and "'b' (busy" in err.value.message
        assert "load_wait" in err.value.message
    assert loaded(sup) <= {"a", "b"}


def test_a_waiting_request_gets_its_model_once_a_busy_one_finishes(start_supervisor):
    sup = start_supervisor(THREE, ram_budget=BUDGET)
    with sup.client() as c1, sup.client() as c2, sup.client() as c3:
        s1 = c1.stream(model="a", prompt="x", max_tokens=60)  # 0.3 s at 200 tok/s
        s2 = c2.stream(model="b", prompt="y", max_tokens=2000)
        next(e for e in s1 if type(e).__name__ == "Token")
        next(e for e in s2 if type(e).__name__ == "Token")
        assert c3.complete(model="c", prompt="z", max_tokens=3).text  # a finishes, is evicted, c loads
        assert loaded(sup) == {"b", "c"}


def test_a_model_larger_than_the_budget_fails_at_once(start_supervisor):
    sup = start_supervisor(THREE + '[models.huge]\nbackend = "fake"\nmemory_bytes = "1GiB"\n', ram_budget=BUDGET)
    t0 = time.monotonic()
    with sup.client() as c, pytest.raises(InsufficientMemory, match="more than the whole budget"):
        c.complete(model="huge", prompt="x", max_tokens=3).text
    assert time.monotonic() - t0 < 1.0 and sup.status()["workers"] == []


def test_pinned_model_is_not_evicted_and_unload_unpins(start_supervisor):
    sup = start_supervisor(THREE, ram_budget=BUDGET)
    cli = [sys.executable, "-m", "stoker.supervisor"]
    out = subprocess.run(cli + ["load", "a", "--pin", "--config", str(sup.config_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    with sup.client() as c:
        c.complete(model="b", prompt="x", max_tokens=3).text
        c.complete(model="c", prompt="x", max_tokens=3).text  # a is older, but pinned: b goes
        assert loaded(sup) == {"a", "c"}
        st = sup.status()
        assert st["memory"]["pinned"] == ["a"]
        assert [w["pinned"] for w in st["workers"] if w["model"] == "a"] == [True]
        c.unload("a")
        c.complete(model="b", prompt="x", max_tokens=3).text
        assert loaded(sup) == {"b", "c"}
    table = subprocess.run(cli + ["status", "--config", str(sup.config_path)], capture_output=True, text=True,
                           timeout=30)
    assert table.returncode == 0 and "RAM" in table.stdout and "budget" in table.stdout, table.stdout
    data = json.loads(subprocess.run(cli + ["status", "--json", "--config", str(sup.config_path)],
                                     capture_output=True, text=True, timeout=30).stdout)
    assert data["memory"]["ram"]["budget"] == BUDGET


def test_replicas_share_the_cores_and_serve_a_queue_together(start_supervisor):
    models = '[models.r]\nbackend = "fake"\ntokens_per_second = 100\nend_every = 0\nreplicas = 2\n'
    sup = start_supervisor(models)
    done: list[str] = []

    def one(i: int) -> None:
        with sup.client() as c:
            done.append(c.complete(model="r", prompt=f"p{i}", max_tokens=20).text)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    wait_for(lambda: len(sup.workers("r")) == 2, 10, "a second replica")
    for t in threads:
        t.join(30)
    assert len(done) == 6
    workers = sup.workers("r")
    assert len(workers) == 2 and all(w["served"] >= 1 for w in workers)
    cores = len(os.sched_getaffinity(0))
    assert sup.log().count(f"for 'r' ({max(1, cores // 2)} threads)") == 2


def test_a_budget_holds_when_a_model_understates_its_memory(start_supervisor):
    """Two models that claim 10 MiB (memory_bytes) and really hold 300 MiB, in a budget of 600:
    the second one's measurement puts the total over, and the idle first one is evicted."""
    models = "\n".join(f'[models.{m}]\nbackend = "fake"\nmemory_bytes = "10MiB"\nallocate_bytes = "300MiB"\n'
                       f'end_every = 0\n' for m in ("a", "b"))
    sup = start_supervisor(models, default_model="a", ram_budget="600MiB")
    with sup.client() as c:
        c.complete("x", model="a", max_tokens=2)
        wait_for(lambda: all(w["measured"] for w in sup.workers("a")), 10, "a to be measured")
        c.complete("x", model="b", max_tokens=2)

    def within() -> bool:
        st = sup.status()
        staying = [w for w in st["workers"] if w["state"] != "stopping"]
        return (st["memory"]["ram"]["used"] <= 600 * MiB and len(staying) == 1
                and sum(w["rss_bytes"] for w in st["workers"]) <= 600 * MiB)

    wait_for(within, 15, "the budget to hold again")
    assert [w["model"] for w in sup.workers()] == ["b"]
    assert "more memory than their models were charged" in sup.log()
    # a again: its measured size does not fit beside b, so b (idle) makes room.
    with sup.client() as c:
        c.complete("y", model="a", max_tokens=2)
    wait_for(within, 15, "the budget to hold again")
    assert [w["model"] for w in sup.workers()] == ["a"]
