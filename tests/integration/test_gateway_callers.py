"""HTTP callers through the gateway: one that disconnects frees its worker within a second
(streaming or not), API keys are required once configured, and callers take turns by key: one
flooding with 200 queued requests does not delay another's by more than one of its own."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.conftest import wait_for

from .gateway_helpers import healthy, start_gateway  # noqa: F401

MODELS = """
[models.tiny]
backend = "fake"
tokens_per_second = 20
end_every = 0

[gateway]
api_keys = ["alice:key-a", "bob:key-b"]
"""
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


def running(sup) -> int:
    return sum(w["running"] for w in sup.workers("tiny"))


def test_a_caller_that_disconnects_frees_the_worker_within_a_second(start_supervisor, start_gateway):
    sup = start_supervisor(models=MODELS, default_model="tiny")
    gw = start_gateway(sup)
    body = {"model": "tiny", "prompt": "go", "max_tokens": 2000, "stream": True}
    with httpx.Client(timeout=30, headers=A) as http:
        with http.stream("POST", gw.url + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
            assert running(sup) == 1
        closed = time.monotonic()
    wait_for(lambda: running(sup) == 0, 5, "the worker to be free")
    assert time.monotonic() - closed < 1.0
    # not streaming: the caller gives up (its client times out) while the request runs
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.url + "/v1/completions", json={**body, "stream": False}, headers=A, timeout=1.0)
    gave_up = time.monotonic()
    wait_for(lambda: running(sup) == 0, 5, "the worker to be free")
    assert time.monotonic() - gave_up < 1.0


def test_keys_are_required_once_configured(start_supervisor, start_gateway):
    sup = start_supervisor(models=MODELS, default_model="tiny")
    gw = start_gateway(sup)
    no = httpx.get(gw.url + "/v1/models")
    assert no.status_code == 401 and no.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(gw.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(gw.url + "/api/tags").status_code == 401 and "error" in httpx.get(gw.url + "/api/tags").json()
    assert httpx.get(gw.url + "/v1/models", headers=B).status_code == 200
    assert httpx.get(gw.url + "/health").status_code == 200  # health and the page itself are open
    assert httpx.get(gw.url + "/").status_code == 200
    assert httpx.get(gw.url + "/status.json").status_code == 401


def test_callers_take_turns_by_key(start_supervisor, start_gateway):
    sup = start_supervisor(models=MODELS, default_model="tiny", max_queue=1000)
    gw = start_gateway(sup)
    one = {"model": "tiny", "prompt": "x", "max_tokens": 3}  # 0.15 s each

    async def main() -> tuple[float, int]:
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            done = 0

            async def alice() -> None:
                nonlocal done
                r = await http.post(gw.url + "/v1/completions", json=one, headers=A)
                assert r.status_code == 200, r.text
                done += 1

            flood = [asyncio.create_task(alice()) for _ in range(200)]
            while True:  # until alice has 200 in the system
                with sup.client() as c:
                    if c.status()["queues"].get("tiny", 0) >= 190:
                        break
                await asyncio.sleep(0.1)
            before = done
            started = time.monotonic()
            r = await http.post(gw.url + "/v1/completions", json=one, headers=B)
            assert r.status_code == 200
            took = time.monotonic() - started
            served_meanwhile = done - before
            for task in flood:
                task.cancel()
            await asyncio.gather(*flood, return_exceptions=True)
            return took, served_meanwhile

    took, served_meanwhile = asyncio.run(main())
    # Served next: behind the one of alice's running, and at most one more of hers.
    assert served_meanwhile <= 2 and took < 1.0, (took, served_meanwhile)
    wait_for(lambda: running(sup) == 0 and not sup.status()["queues"], 10, "alice's cancelled requests to go")


def test_serve_runs_the_gateway_as_a_child_restarts_it_and_stops_it(start_supervisor):
    import os
    import signal

    import psutil

    from .gateway_helpers import free_port

    port = free_port()
    models = MODELS.replace("[gateway]", f'[gateway]\nlisten = "127.0.0.1:{port}"')
    sup = start_supervisor(models=models, default_model="tiny")
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        return healthy(url)

    def gateway_pid() -> int | None:
        for kid in psutil.Process(sup.proc.pid).children():
            try:
                if "stoker.gateway" in " ".join(kid.cmdline()):
                    return kid.pid
            except psutil.Error:  # gone, or a zombie not yet reaped
                pass
        return None

    wait_for(answers, 30, "the gateway child to answer")
    first = gateway_pid()
    assert first is not None
    assert httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                      headers=A, timeout=30).json()["choices"][0]["finish_reason"] == "length"
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: gateway_pid() not in (None, first) and answers(), 30, "a new gateway")
    assert "the gateway exited" in sup.log()
    second = gateway_pid()
    sup.stop()
    assert not psutil.pid_exists(second) or psutil.Process(second).status() == psutil.STATUS_ZOMBIE
    assert (sup.folder / "state" / "gateway.log").exists()


def test_a_slow_http_reader_stalls_nobody(start_supervisor, start_gateway):
    models = MODELS.replace('tokens_per_second = 20', 'tokens_per_second = 2000\nparallel = 4')
    sup = start_supervisor(models=models, default_model="tiny")
    gw = start_gateway(sup)
    import socket

    # A caller that asks for a long stream and never reads it: its socket's buffers fill.
    body = json.dumps({"model": "tiny", "prompt": "go", "max_tokens": 20000, "stream": True}).encode()
    raw = socket.create_connection(("127.0.0.1", int(gw.url.rsplit(":", 1)[1])))
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer key-a\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    wait_for(lambda: running(sup) == 1, 10, "the slow caller's request to run")
    started = time.monotonic()
    for i in range(5):
        r = httpx.post(gw.url + "/v1/completions", json={"model": "tiny", "prompt": f"q{i}", "max_tokens": 50},
                       headers=B, timeout=10)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 50
    assert time.monotonic() - started < 3.0
    raw.close()
    wait_for(lambda: running(sup) == 0, 5, "the slow caller's request to be cancelled")


def test_a_gateway_others_can_reach_needs_keys(start_supervisor):
    import subprocess
    import sys

    sup = start_supervisor(models=MODELS.split("[gateway]")[0], default_model="tiny")
    done = subprocess.run([sys.executable, "-m", "stoker.supervisor", "gateway", "--listen", "0.0.0.0:1",
                           "--config", str(sup.config_path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "with no API key" in done.stderr and "Traceback" not in done.stderr


def test_requests_from_other_web_sites_are_refused(start_supervisor, start_gateway):
    sup = start_supervisor(models=MODELS.split("[gateway]")[0], default_model="tiny")
    gw = start_gateway(sup)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 1}
    other = httpx.post(gw.url + "/v1/completions", json=body, headers={"Origin": "https://evil.example"})
    assert other.status_code == 403 and "another web site" in other.json()["error"]["message"]
    rebound = httpx.post(gw.url + "/api/generate", json={"model": "tiny", "prompt": "x"},
                         headers={"Host": "evil.example:8080"})
    assert rebound.status_code == 403 and "its own address" in rebound.json()["error"]
    host = gw.url.split("//")[1]
    same = httpx.post(gw.url + "/v1/completions", json=body, headers={"Origin": f"http://{host}"})
    assert same.status_code == 200
    assert running(sup) == 0
