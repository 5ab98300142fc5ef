"""Clients survive a supervisor killed with SIGKILL and started again 2 s later (what systemd's
Restart=on-failure does): every request lost with it is sent again to the new one, streams go on
where they stood, and nothing is repeated or missing. One that stays away ends with Unreachable."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stoker.protocol.async_client import AsyncClient
from stoker.protocol.client import Client, End, Info, Token
from stoker.protocol.errors import Unreachable, UnknownModel
from stoker.workers.fake_backend import complete as fake_complete
from tests.conftest import wait_for
from tests.integration.test_batch import lines

MODEL = '[models.f]\nbackend = "fake"\ntokens_per_second = 1000\nend_every = 0\n'
STREAM = '[models.f]\nbackend = "fake"\ntokens_per_second = 100\nend_every = 0\n'
CLI = [sys.executable, "-m", "stoker.supervisor"]
RESTART_AFTER_S = 2.0


def expected(prompt: str, n: int) -> str:
    return "".join(fake_complete(prompt, 0, n, 0)[0])


def kill_and_restart(start_supervisor, sup, models: str):
    """SIGKILL the supervisor, wait as systemd would, start a new one on the same endpoint."""
    sup.proc.send_signal(signal.SIGKILL)
    sup.proc.wait(10)
    time.sleep(RESTART_AFTER_S)
    return start_supervisor(models, default_model="f")


def batch_and_run(sup, folder: Path, items: int, tokens: int, run_model: str, run_tokens: int, timeout: int):
    """`stoker batch` of `items` prompts (`tokens` each) on model f, and a `stoker run` on
    `run_model`, both running against `sup`; returns (batch, run, OUTPUT)."""
    inp, out = folder / "in.jsonl", folder / "out.jsonl"
    with inp.open("w") as f:
        for i in range(items):
            f.write(json.dumps({"id": i, "prompt": f"item {i}", "max_tokens": tokens}) + "\n")
    common = ["--no-start", "--timeout", str(timeout), "--config", str(sup.config_path)]
    job = subprocess.Popen(CLI + ["batch", str(inp), "-o", str(out), "-j", "8"] + common,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = subprocess.Popen(CLI + ["run", "a long story", "-m", run_model, "-n", str(run_tokens)] + common,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return job, run, out


def test_a_batch_and_a_cli_stream_complete_across_a_kill_and_restart(start_supervisor, short_dir):
    sup = start_supervisor(MODEL, default_model="f")
    job, run, out = batch_and_run(sup, short_dir, 300, 20, "f", 400, timeout=30)
    try:
        wait_for(lambda: len(lines(out)) >= 60, 60, "the batch to be under way")
        assert job.poll() is None, job.communicate()
        sup = kill_and_restart(start_supervisor, sup, MODEL)
        _, err = job.communicate(timeout=120)
        assert job.returncode == 0, err
        stdout, run_err = run.communicate(timeout=120)
        assert run.returncode == 0, run_err
    finally:
        for p in (job, run):
            if p.poll() is None:
                p.kill()
    got = lines(out)
    assert len(got) == 300 and sorted(x["id"] for x in got) == list(range(300))  # every id once
    for x in got:
        assert "error" not in x, x
        assert x["text"] == expected(f"item {x['id']}", 20), x
        assert x["usage"]["completion_tokens"] == 20
    # The stream went on where it stood: the text of an undisturbed run, once.
    assert stdout.strip() == expected("a long story", 400).strip()


def test_client_streams_resume_with_contiguous_seq_sync_and_async(start_supervisor):
    sup = start_supervisor(STREAM, default_model="f")
    seen: dict[str, list] = {}
    with Client(sup.endpoint, timeout=30) as c:
        stream = c.stream("sync story", max_tokens=300)
        events = [next(stream) for _ in range(12)]  # under way: info, then tokens
        assert any(isinstance(e, Token) for e in events)

        async def async_side() -> None:
            async with AsyncClient(sup.endpoint, timeout=30) as ac:
                got = []
                async for ev in ac.generate("async story", max_tokens=300).events():
                    got.append(ev)
                    if len(got) == 12:
                        restarted.set()
                seen["async"] = got

        restarted = threading.Event()
        thread = threading.Thread(target=lambda: asyncio.run(async_side()))
        thread.start()
        restarted.wait(30)
        sup = kill_and_restart(start_supervisor, sup, STREAM)
        events += list(stream)
        thread.join(60)
        assert not thread.is_alive()
        seen["sync"] = events
        # and the client goes on working with the new supervisor
        assert c.complete("after", max_tokens=5).text == expected("after", 5)
        assert c.ping()["instance"] != ""
    for name, evs in seen.items():
        tokens = [e for e in evs if isinstance(e, Token)]
        seq = 0
        for t in tokens:
            assert t.seq == seq, (name, t, seq)
            seq += t.n
        assert isinstance(evs[-1], End) and evs[-1].usage["completion_tokens"] == 300 == seq
        assert "".join(t.text for t in tokens) == expected(f"{name} story", 300)
        assert sum(isinstance(e, Info) for e in evs) >= 2  # the new supervisor said where it stood


def test_a_restarted_supervisor_that_lacks_the_model_fails_the_request_clearly(start_supervisor):
    sup = start_supervisor(STREAM, default_model="f")
    with Client(sup.endpoint, timeout=30) as c:
        stream = c.generate("x", max_tokens=500)
        tokens = iter(stream)
        next(tokens)
        sup.proc.send_signal(signal.SIGKILL)
        sup.proc.wait(10)
        sup = start_supervisor('[models.other]\nbackend = "fake"\n', default_model="other")
        t0 = time.monotonic()
        with pytest.raises(UnknownModel):
            list(tokens)
        assert time.monotonic() - t0 < 20


def test_a_supervisor_that_stays_away_ends_requests_with_unreachable(start_supervisor):
    sup = start_supervisor(STREAM, default_model="f")
    t0 = None
    with Client(sup.endpoint, timeout=2) as c:
        stream = c.generate("x", max_tokens=500)
        tokens = iter(stream)
        next(tokens)
        sup.proc.send_signal(signal.SIGKILL)
        sup.proc.wait(10)
        t0 = time.monotonic()
        with pytest.raises(Unreachable):
            list(tokens)
    assert time.monotonic() - t0 < 8


def test_cli_exit_codes_when_the_supervisor_goes_away_for_good(start_supervisor, short_dir):
    sup = start_supervisor(STREAM + STREAM.replace("models.f", "models.g"), default_model="f")
    job, run, out = batch_and_run(sup, short_dir, 50, 50, "g", 2000, timeout=3)
    try:
        wait_for(lambda: len(lines(out)) >= 1, 60, "the batch to be under way")
        wait_for(lambda: [w["state"] for w in sup.workers("g")] == ["busy"], 30, "the run to be under way")
        sup.proc.send_signal(signal.SIGKILL)
        sup.proc.wait(10)
        _, err = job.communicate(timeout=60)
        run_out, run_err = run.communicate(timeout=60)
    finally:
        for p in (job, run):
            if p.poll() is None:
                p.kill()
    assert job.returncode == 2, err  # went away: 2, not 4 (timeout)
    assert run.returncode == 2, (run_out, run_err, sup.log())
    assert "did not answer" in err and "did not answer" in run_err
