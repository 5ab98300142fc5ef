"""The supervisor's decisions put together (core.py), in-process: events in, actions out."""

import time
from pathlib import Path

from stoker.protocol.messages import ErrorCode, Reason
from stoker.protocol.validation import parse_request
from stoker.supervisor.config import resolve_config
from stoker.supervisor.core import BeginShutdown, Core, ReportStatus
from stoker.supervisor.model_files import ModelFiles
from stoker.supervisor.requests import CancelOnWorker, Forget, Reply, RunOnWorker
from stoker.supervisor.scheduler import StartWorker, StopWorker

A, B = b"\x00a", b"\x00b"


def core(tmp_path: Path, **models: str) -> Core:
    body = "\n".join(f'[models.{name}]\nbackend = "fake"\n{extra}' for name, extra in models.items())
    (tmp_path / "c.toml").write_text(f'[supervisor]\nstate_dir = "{tmp_path}"\ndefault_model = "f"\n\n{body}\n')
    cfg = resolve_config(tmp_path / "c.toml", environ={"HOME": str(tmp_path)})
    return Core(cfg, ModelFiles(lambda: None), instance="inst")


def req(op: str, rid, **keys):
    return parse_request({"v": 1, "op": op, "id": rid, **keys})


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def test_a_generate_from_arrival_to_its_end(tmp_path):
    c = core(tmp_path, f="")
    out = c.request(A, req("generate", 1, prompt="hi", max_tokens=3), 0.0)
    [start] = of(out, StartWorker)
    [info] = of(out, Reply)
    assert info.client == A and info.message["state"] == "loading" and info.message["instance"] == "inst"
    c.worker_hello(start.wid)
    out = c.worker_ready(start.wid, 250.0, 1.0)
    [run] = of(out, RunOnWorker)
    assert run.wid == start.wid and run.body["prompt"] == "hi" and run.body["max_tokens"] == 3
    assert of(out, Reply)[0].message["state"] == "running"
    c.tokens(start.wid, run.job_no, "a", 1, 1.1)
    c.tokens(start.wid, run.job_no, "b", 1, 1.2)
    c.tokens(start.wid, 999, "late", 1, 1.2)  # not a job this worker runs: dropped
    [frame] = of(c.flush(1.3), Reply)
    assert frame.message["text"] == "ab" and frame.message["n"] == 2
    out = c.job_ended(start.wid, run.job_no, 1.5, Reason.LENGTH, 2)
    [end] = of(out, Reply)
    assert end.message["ev"] == "end" and end.message["timings"]["load_ms"] == 250.0
    assert of(out, Forget)[0].outcome == "length"
    assert c.runs_nothing(start.wid) and c.scheduler.workers[start.wid].state.value == "idle"
    assert c.job_ended(start.wid, run.job_no, 1.6, Reason.LENGTH, 2) == []  # a second end: late


def test_refusals_raise_and_change_nothing(tmp_path):
    c = core(tmp_path, f="")
    c.request(A, req("generate", 1, prompt="x"), 0.0)
    for bad in (req("generate", 1, prompt="again"), req("generate", 2, prompt="x", model="nope")):
        try:
            c.request(A, bad, 0.1)
        except Exception as exc:
            assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_MODEL)
        else:
            raise AssertionError("refused requests raise")
    assert len(c.requests) == 1
    assert c.request(B, req("generate", 1, prompt="same id, other client"), 0.2)  # ids are per client


def test_ops_ping_status_models_shutdown(tmp_path):
    c = core(tmp_path, f="")
    [pong] = c.request(A, req("ping", 1), 0.0)
    assert pong.message["data"]["instance"] == "inst" and pong.message["data"]["session"] == f"inst/{A.hex()}"
    assert c.request(A, req("status", 2), 0.0) == [ReportStatus(A, 2)]
    out = c.request(A, req("models", 3), 0.0)
    if not out:  # a model with a file (the demo's) is being looked at, off the loop: answered after
        deadline = time.monotonic() + 10
        while not out and time.monotonic() < deadline:
            time.sleep(0.01)
            out = c.files_looked(1.0)
    [models] = out
    assert "f" in [m["name"] for m in models.message["data"]["models"]]
    out = c.request(A, req("shutdown", 4), 0.0)
    assert out[0].message["data"] == {"stopping": True} and out[1] == BeginShutdown()
    c.begin_shutdown(0.1)
    try:
        c.request(A, req("generate", 5, prompt="late"), 0.2)
    except Exception as exc:
        assert exc.code is ErrorCode.SHUTTING_DOWN
    else:
        raise AssertionError("no new work once stopping")


def test_cancel_client_gone_and_a_crash_resume(tmp_path):
    c = core(tmp_path, f="")
    start = of(c.request(A, req("generate", "run", prompt="p", max_tokens=10), 0.0), StartWorker)[0]
    c.request(A, req("generate", "wait", prompt="q"), 0.0)
    c.worker_hello(start.wid)
    [run] = of(c.worker_ready(start.wid, 10.0, 0.5), RunOnWorker)
    c.tokens(start.wid, run.job_no, "so far", 2, 0.6)
    c.flush(0.6)
    # The queued one is cancelled at once, its end before the cancel's result.
    out = c.request(A, req("cancel", "c", target="wait"), 0.7)
    assert [r.message["ev"] for r in of(out, Reply)] == ["end", "result"]
    assert not c.scheduler.queues["f"]
    # The worker dies mid-stream: a new one starts and the request resumes where it stood.
    out = c.worker_exited(start.wid, 1.0, "killed by SIGKILL")
    [again] = of(out, StartWorker)
    c.worker_hello(again.wid)
    [resumed] = of(c.worker_ready(again.wid, 10.0, 1.5), RunOnWorker)
    assert resumed.resume == "so far" and resumed.body["max_tokens"] == 8
    # Its client leaves: the worker is told to stop; the end that follows goes nowhere.
    out = c.client_gone(A, 2.0)
    assert out == [CancelOnWorker(again.wid, resumed.job_no)]
    out = c.job_ended(again.wid, resumed.job_no, 2.1, Reason.CANCELLED, 3)
    assert of(out, Reply) == [] and of(out, Forget)[0].outcome == "cancelled"


def test_unload_waits_for_the_worker_and_a_load_that_cannot_fit_fails(tmp_path):
    c = core(tmp_path, f="", big='memory_bytes = "900TiB"\n')
    start = of(c.request(A, req("load", "l", model="f"), 0.0), StartWorker)[0]
    c.worker_hello(start.wid)
    [loaded] = of(c.worker_ready(start.wid, 1.0, 0.5), Reply)
    assert loaded.message["data"] == {"model": "f", "loaded": True}
    out = c.request(A, req("unload", "u", model="f"), 1.0)
    assert out == [StopWorker(start.wid)]
    [done] = of(c.worker_exited(start.wid, 1.5, "exited with code 0"), Reply)
    assert done.message["data"] == {"model": "f", "unloaded": True}
    c.scheduler.settings = c.scheduler.settings.__class__(budget=c.scheduler.settings.budget.__class__(ram=10**9))
    [err] = of(c.request(A, req("generate", "g", prompt="x", model="big"), 2.0), Reply)
    assert err.message["code"] == "insufficient_memory"


def test_a_bug_part_way_through_a_call_loses_no_decision_already_made(tmp_path, monkeypatch):
    """The scheduler decided to start a worker, then working out the replies raised: the start
    still reaches the loop (with the internal error), so no slot waits for a process never started."""
    c = core(tmp_path, f="")

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(c.requests, "notify", broken)
    try:
        c.request(A, req("generate", 1, prompt="hi"), 0.0)
        raise AssertionError("expected the bug to raise")
    except RuntimeError:
        pass
    out = c.internal_error(A, 1, 0.0)
    [start] = of(out, StartWorker)
    assert start.wid in c.scheduler.workers
    assert [r.message["code"] for r in of(out, Reply) if r.message.get("ev") == "error"] == ["internal"]
    assert c.take() == []  # handed over once
