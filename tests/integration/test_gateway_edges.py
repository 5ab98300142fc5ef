"""The gateway at its edges: no supervisor, a supervisor killed outright, wrong types, unknown
paths, keep_alive on a load, and refusals counted where the page and metrics can see them."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from stoker.protocol.async_client import AsyncClient
from stoker.protocol.errors import Unreachable
from tests.conftest import wait_for

from .gateway_helpers import RunningGateway, free_port, healthy, start_gateway  # noqa: F401
from .test_gateway_openai import MODELS


@pytest.fixture
def gw(start_supervisor, start_gateway):
    sup = start_supervisor(models=MODELS, default_model="f", idle_timeout=60)
    return start_gateway(sup), sup


def test_with_no_supervisor_every_api_answers_503_at_once(short_dir):
    port = free_port()
    log_path = short_dir / "gw.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "stoker.gateway", "--listen", f"127.0.0.1:{port}",
                                 "--endpoint", f"ipc://{short_dir}/none.sock"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    g = RunningGateway(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        def up() -> bool:
            assert proc.poll() is None, g.log()
            try:
                return httpx.get(g.url + "/health", timeout=1).status_code == 503
            except httpx.HTTPError:
                return False

        wait_for(up, 30, "the gateway to answer")
        calls = [("GET", "/v1/models", None), ("POST", "/v1/chat/completions",
                                               {"model": "f", "messages": [{"role": "user", "content": "x"}]}),
                 ("GET", "/api/tags", None), ("POST", "/api/chat", {"model": "f", "messages": []}),
                 ("GET", "/status.json", None), ("GET", "/api/ps", None)]
        for method, path, body in calls:
            started = time.monotonic()
            r = httpx.request(method, g.url + path, json=body, timeout=30)
            assert r.status_code == 503 and time.monotonic() - started < 3, (path, r.text)
            assert "no supervisor" in r.text and "Traceback" not in r.text
        assert httpx.get(g.url + "/v1/models").json()["error"]["code"] == "supervisor_unavailable"
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_request_given_up_on_is_not_run_when_a_supervisor_comes(start_supervisor, short_dir):
    """A request sent while no supervisor listens waits in the socket's queue; the client gives up
    after its timeout (Unreachable), and then cancels it, so a supervisor that comes later does
    not run it for nobody."""
    endpoint = f"ipc://{short_dir}/s.sock"

    async def give_up() -> None:  # (wait_for sleeps in this loop's thread: nothing else runs in it)
        client = AsyncClient(endpoint, timeout=0.5)
        try:
            with pytest.raises(Unreachable):
                await client.complete("hello", model="tiny", max_tokens=5)
            sup = start_supervisor(models=MODELS, default_model="f")
            # It reaches the supervisor with its cancel right behind it: ended before a token.
            wait_for(lambda: "on 'tiny': cancelled, 0 tokens" in sup.log(), 10, "the abandoned request's cancel")
            assert "on 'tiny': length" not in sup.log()
        finally:
            await client.close()

    asyncio.run(give_up())


def test_a_gateway_child_stops_when_its_supervisor_is_killed(start_supervisor):
    port = free_port()
    sup = start_supervisor(models=MODELS + f'\n[gateway]\nlisten = "127.0.0.1:{port}"\n', default_model="f")
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        return healthy(url)

    wait_for(answers, 30, "the gateway child to answer")
    [child] = [k for k in psutil.Process(sup.proc.pid).children() if "stoker.gateway" in " ".join(k.cmdline())]
    sup.proc.send_signal(signal.SIGKILL)
    sup.proc.wait(10)
    wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 10,
             "the orphaned gateway to stop")
    assert not answers()


def test_stoker_serve_refuses_a_reachable_gateway_without_keys(short_dir):
    from tests.conftest import write_config

    path, _ = write_config(short_dir, MODELS + '\n[gateway]\nlisten = "0.0.0.0:18080"\n')
    done = subprocess.run([sys.executable, "-m", "stoker.supervisor", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "no API key" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_wrong_types_are_400s_not_guesses(gw):
    g, sup = gw
    msgs = [{"role": "user", "content": "x"}]
    openai = [
        {"model": "f", "messages": msgs, "stream": "no"},
        {"model": 5, "messages": msgs},
        {"model": "f", "messages": msgs, "user": 5},
        {"model": "f", "messages": msgs, "logprobs": "yes"},
        {"model": "f", "messages": [{"role": "bogus", "content": "x"}]},
        {"model": "f", "messages": msgs, "stream_options": {"include_usage": True}},
    ]
    for body in openai:
        r = httpx.post(g.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (body, r.text)
    ollama = [
        ("/api/chat", {"model": "f", "messages": msgs, "stream": "no"}),
        ("/api/chat", {"model": "f", "messages": [{"role": "wizard", "content": "x"}]}),
        ("/api/embed", {"model": "f", "input": "x", "truncate": "no"}),
        ("/api/embed", {"model": "f", "input": "x", "dimensions": 4}),
        ("/api/generate", {"model": "f", "prompt": "x", "options": {"num_predict": 0}}),
    ]
    for path, body in ollama:
        r = httpx.post(g.url + path, json=body, timeout=30)
        assert r.status_code == 400 and isinstance(r.json()["error"], str), (body, r.text)
    assert "num_predict" in r.json()["error"]
    # stream: null is Ollama's default (streaming)
    lines = httpx.post(g.url + "/api/generate", json={"model": "f", "prompt": "x", "stream": None,
                                                      "options": {"num_predict": 3}}, timeout=30).text.splitlines()
    assert len(lines) >= 2 and json.loads(lines[-1])["done"] is True


def test_unknown_paths_and_methods_answer_in_the_apis_shape(gw):
    g, _ = gw
    r = httpx.get(g.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(g.url + "/v1/chat/completions")
    assert r.status_code == 405 and "GET" in r.json()["error"]["message"]
    r = httpx.get(g.url + "/api/nothing")
    assert r.status_code == 404 and "nothing" in r.json()["error"]


def test_host_names_are_case_blind(gw):
    g, _ = gw
    port = g.url.rsplit(":", 1)[1]
    for host in (f"LOCALHOST:{port}", f"localhost.:{port}"):
        assert httpx.get(g.url + "/api/version", headers={"Host": host}).status_code == 200


def test_ollama_keep_alive_on_a_load_and_in_ps(gw):
    g, sup = gw
    loaded = httpx.post(g.url + "/api/generate", json={"model": "tiny", "keep_alive": "1s"}, timeout=30).json()
    assert loaded["done_reason"] == "load"
    wait_for(lambda: not sup.workers("tiny"), 10, "tiny to unload 1 s after its load")
    httpx.post(g.url + "/api/generate", json={"model": "tiny", "prompt": "x", "stream": False, "keep_alive": "30s",
                                              "options": {"num_predict": 1}}, timeout=30)
    [row] = [m for m in httpx.get(g.url + "/api/ps").json()["models"] if m["name"] == "tiny"]
    from datetime import datetime, timezone

    left = (datetime.fromisoformat(row["expires_at"].replace("Z", "+00:00")) - datetime.now(timezone.utc)).total_seconds()
    assert 20 < left <= 31, row  # the request's keep_alive, not Ollama's 5 minutes
    # No keep_alive: the model's idle_timeout (60 s here) stands, not Ollama's default 5 minutes.
    httpx.post(g.url + "/api/generate", json={"model": "tiny", "prompt": "x", "stream": False,
                                              "options": {"num_predict": 1}}, timeout=30)
    [row] = [m for m in httpx.get(g.url + "/api/ps").json()["models"] if m["name"] == "tiny"]
    left = (datetime.fromisoformat(row["expires_at"].replace("Z", "+00:00")) - datetime.now(timezone.utc)).total_seconds()
    assert 50 < left <= 61, row


def test_refused_and_abandoned_requests_are_on_the_page(gw):
    g, _ = gw
    httpx.post(g.url + "/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    httpx.post(g.url + "/api/chat", json={"model": "f", "messages": [{"role": "user", "content": "x"}],
                                         "options": {"wat": 1}})
    with httpx.stream("POST", g.url + "/api/generate", json={"model": "tiny", "prompt": "x",
                                                            "options": {"num_predict": 100000}}, timeout=30) as r:
        next(r.iter_lines())
    recent = []

    def seen() -> bool:
        recent[:] = httpx.get(g.url + "/status.json").json()["recent"]
        return {"cancelled", "bad_request", "model_not_found"} <= {x["outcome"] for x in recent}

    wait_for(seen, 10, "the refusals and the abandoned stream on the page")
    assert {"nope", "f", "tiny"} <= {x["model"] for x in recent}
