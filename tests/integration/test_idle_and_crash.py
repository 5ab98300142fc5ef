"""Idle workers exit after idle_timeout; crashed workers are replaced; broken models fail clearly."""

import os
import signal
import time

import psutil
import pytest

from stoker.protocol.errors import LoadFailed, WorkerCrashed
from stoker.workers.fake_backend import complete

from ..conftest import wait_for
from .helpers import raw_socket, recv, send, text_of


def test_idle_worker_exits_after_idle_timeout(start_supervisor):
    sup = start_supervisor(idle_timeout=1)
    with sup.client() as c:
        c.complete("x", model="echo", max_tokens=2).text
    [w] = sup.workers()
    wait_for(lambda: sup.workers() == [], 10, "the idle worker to unload")
    wait_for(lambda: not psutil.pid_exists(w["pid"]), 5, "the worker process to be gone")
    with sup.client() as c:  # and the model loads again on demand
        assert c.complete("x", model="echo", max_tokens=2).text == "".join(complete("x", 0, 2)[0])


def test_keep_alive_zero_unloads_right_after_the_request(start_supervisor):
    sup = start_supervisor(idle_timeout=300)
    with sup.client() as c:
        c.complete("x", model="echo", max_tokens=2, keep_alive=0).text
    wait_for(lambda: sup.workers() == [], 10, "keep_alive=0 to unload the model")


def test_kill_9_of_an_idle_worker_is_followed_by_a_replacement(start_supervisor):
    sup = start_supervisor()
    with sup.client() as c:
        c.complete("x", model="echo", max_tokens=2).text
        [old] = sup.workers()
        os.kill(old["pid"], signal.SIGKILL)
        new = wait_for(lambda: [w for w in sup.workers("echo", "idle") if w["pid"] != old["pid"]], 20,
                       "a replacement worker")
        assert new[0]["served"] == 0
        assert c.complete("after", model="echo", max_tokens=5).text == "".join(complete("after", 0, 5)[0])
    assert "killed by SIGKILL" in sup.log()


def test_crash_before_the_first_token_reruns_the_request_on_a_replacement(start_supervisor):
    models = '[models.glacial]\nbackend = "fake"\ntokens_per_second = 0.25\n'  # first token after 4 s
    sup = start_supervisor(models=models, default_model="glacial")
    sock = raw_socket(sup.endpoint)
    send(sock, op="generate", id="g", prompt="slow start", max_tokens=1)
    assert recv(sock)["state"] == "loading"
    assert recv(sock)["state"] == "running"
    [w] = sup.workers()
    os.kill(w["pid"], signal.SIGKILL)  # it is sleeping before its first token
    replies = []
    while not replies or replies[-1]["ev"] not in ("end", "error"):
        replies.append(recv(sock, 30))
    assert replies[-1]["ev"] == "end", replies[-1]
    assert text_of(replies) == "".join(complete("slow start", 0, 1)[0])
    sock.close()


def _stream_until_tokens(sock, rid: str, count: int) -> list:
    """Read a generate's replies until at least `count` tokens have arrived."""
    replies = []
    while sum(r.get("n", 0) for r in replies if r["ev"] == "token") < count:
        replies.append(recv(sock))
        assert replies[-1]["ev"] not in ("end", "error"), replies[-1]
    return replies


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
def test_a_request_whose_worker_dies_or_hangs_mid_stream_resumes_on_a_new_one(start_supervisor, how):
    sup = start_supervisor(worker_liveness=1.0)
    sock = raw_socket(sup.endpoint)
    send(sock, op="generate", id="g", model="endless", prompt="resume me", max_tokens=60, temperature=0)
    replies = _stream_until_tokens(sock, "g", 10)
    [w] = sup.workers("endless")
    os.kill(w["pid"], how)
    while replies[-1]["ev"] not in ("end", "error"):
        replies.append(recv(sock))
    end = replies[-1]
    assert end["ev"] == "end" and end["reason"] == "length", end
    # One uninterrupted stream: seq contiguous (text_of checks), the same text as a clean run.
    assert text_of(replies) == "".join(complete("resume me", 0, 60, 0)[0])
    assert end["usage"]["completion_tokens"] == 60
    assert [r["state"] for r in replies if r["ev"] == "info"] == ["loading", "running"]
    [new] = sup.workers("endless")
    assert new["pid"] != w["pid"]
    assert not psutil.pid_exists(w["pid"]) or psutil.Process(w["pid"]).status() == psutil.STATUS_ZOMBIE
    if how == signal.SIGSTOP:
        assert "sent nothing for" in sup.log() and "stopped answering" in sup.log()
    sock.close()


def test_a_request_that_outlives_max_retries_workers_ends_with_worker_crashed(start_supervisor):
    sup = start_supervisor(max_retries=1)
    with sup.client() as c:
        stream = c.stream("long", model="endless", max_tokens=500)
        pids = set()
        with pytest.raises(WorkerCrashed, match=r"died 2 times .*max_retries = 1.*SIGKILL"):
            for ev in stream:
                if getattr(ev, "text", None):
                    [w] = sup.workers("endless", "busy") or [{"pid": None}]
                    if w["pid"] is not None and w["pid"] not in pids:
                        pids.add(w["pid"])
                        os.kill(w["pid"], signal.SIGKILL)
        assert len(pids) == 2
        # The model stays usable: a replacement serves the next request.
        assert c.complete("next", model="endless", max_tokens=3).text == "".join(complete("next", 0, 3, 0)[0])


def test_a_model_that_cannot_load_fails_with_the_reason_after_four_tries(start_supervisor):
    models = '[models.broken]\nbackend = "fake"\nfail_load = "weights are corrupt at byte 42"\n'
    sup = start_supervisor(models=models, default_model="broken")
    with sup.client() as c:
        with pytest.raises(LoadFailed) as exc:
            c.complete("x", max_tokens=2).text
        assert "more than 3 times" in exc.value.message and "weights are corrupt at byte 42" in exc.value.message
        # Marked failed: the next request fails at once instead of loading again.
        with pytest.raises(LoadFailed):
            c.complete("y", max_tokens=2).text
    assert sup.log().count("could not load 'broken'") == 4


def test_the_crash_loop_breaker_trips_and_recovers_by_load_or_cooldown(start_supervisor, short_dir):
    weights = short_dir / "weights.bin"
    models = f'[models.flaky]\nbackend = "fake"\npath = "{weights}"\n'
    sup = start_supervisor(models=models, default_model="flaky", crash_loop_max=2, crash_loop_cooldown=3)
    expected = "".join(complete("x", 0, 3)[0])
    with sup.client() as c:
        with pytest.raises(LoadFailed) as exc:
            c.complete("x", max_tokens=3).text
        assert "more than 2 times" in exc.value.message and "does not exist" in exc.value.message
        assert "stoker load flaky" in exc.value.message
        started = time.monotonic()
        with pytest.raises(LoadFailed):
            c.complete("x", max_tokens=3).text
        assert time.monotonic() - started < 1.0  # at once, no load tried
        assert sup.log().count("could not load 'flaky'") == 3
        # The user fixes the model, and `stoker load` retries it at once.
        weights.write_text("weights")
        c.load("flaky")
        assert c.complete("x", max_tokens=3).text == expected
        # Broken again: it trips again, and this time recovers by itself after the cool-down.
        c.unload("flaky")
        weights.unlink()
        with pytest.raises(LoadFailed):
            c.complete("x", max_tokens=3).text
        tripped = time.monotonic()
        weights.write_text("weights")
        with pytest.raises(LoadFailed):  # still cooling down
            c.complete("x", max_tokens=3).text
        time.sleep(max(0.0, tripped + 3.2 - time.monotonic()))
        assert c.complete("x", max_tokens=3).text == expected


def test_a_worker_that_crashes_at_load_fails_with_its_last_log_lines(start_supervisor):
    models = '[models.crashy]\nbackend = "fake"\nfail_load = "crash"\n'
    sup = start_supervisor(models=models, default_model="crashy")
    with sup.client() as c:
        with pytest.raises(LoadFailed) as exc:
            c.load("crashy")
    assert "SIGKILL" in exc.value.message and "crashing at load as configured" in exc.value.message
    assert sup.workers() == []


def test_a_llama_model_with_a_bad_file_fails_to_load_with_a_clear_message(start_supervisor, short_dir):
    bad = short_dir / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file")
    models = f'[models.bad]\nbackend = "llama"\npath = "{bad}"\n'
    sup = start_supervisor(models=models, default_model="bad")
    with sup.client() as c:
        with pytest.raises(LoadFailed) as exc:
            c.complete("x", max_tokens=2).text
    assert "bad" in exc.value.message and "3 times" in exc.value.message
