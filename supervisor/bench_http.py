"""`stoker bench --http`: what the HTTP gateway costs, measured in one run against the direct
ZeroMQ client on the same private supervisor: the warm time to the first token, streaming
tokens/s (the model's own), and requests/s of short requests (a fast fake model, where the
gateway's own cost is all there is to see). The two sides take turns, in alternating order.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

from stoker.protocol.async_client import AsyncClient
from stoker.protocol.client import Client
from stoker.supervisor.bench import FAKE, PROMPT, PrivateSupervisor, _alternately, _decode_tps, _stream, machine
from stoker.supervisor.config import ModelConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateGateway:
    def __init__(self, sup: PrivateSupervisor) -> None:
        import httpx

        self.url = f"http://127.0.0.1:{_free_port()}"
        self.proc = subprocess.Popen([sys.executable, "-m", "stoker.gateway", "--listen", self.url[7:],
                                      "--config", str(sup.folder / "config.toml")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("the bench gateway did not start")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class RawHttp:
    """A minimal HTTP/1.1 client on one kept-alive socket, for the streaming measures: what it
    costs is next to nothing, so the figures are the gateway's, not an HTTP library's (httpx
    spends about a millisecond of Python on each request on this machine)."""

    def __init__(self, url: str) -> None:
        host, port = url[len("http://"):].rsplit(":", 1)
        self.host = host
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise RuntimeError("the gateway closed the connection")
        self.buf += data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._more()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exactly(self, size: int) -> bytes:
        while len(self.buf) < size:
            self._more()
        data, self.buf = self.buf[:size], self.buf[size:]
        return data

    def stream(self, body: dict[str, Any]) -> tuple[float, list[float]]:
        """POST /v1/completions with stream: the send time, and each token's arrival."""
        payload = json.dumps(body).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n").encode()
        t0 = time.perf_counter()
        self.sock.sendall(head + payload)
        status = self._line()
        if b" 200 " not in status:
            raise RuntimeError(f"the gateway answered {status.decode(errors='replace')}")
        while self._line():  # headers (the stream is chunked)
            pass
        stamps: list[float] = []
        pending = b""
        while True:
            size = int(self._line().split(b";")[0], 16)
            data = self._exactly(size)
            self._exactly(2)
            if size == 0:
                return t0, stamps
            now = time.perf_counter()
            pending += data
            *events, pending = pending.split(b"\n\n")
            for event in events:
                if event.startswith(b"data: {"):
                    choices = json.loads(event[6:])["choices"]
                    if choices and choices[0]["text"]:
                        stamps.append(now)

    def close(self) -> None:
        self.sock.close()


def _http_stream(http: RawHttp, model: str, prompt: str, n: int) -> tuple[float, list[float]]:
    """The send time and each token's arrival, streamed through /v1/completions (SSE)."""
    return http.stream({"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "seed": 0,
                        "stream": True})


def _requests_per_s(run_one: Callable[[int], Any], clients: int, per_client: int) -> float:
    async def main() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(run_one(c) for c in range(clients)))
        return clients * per_client / (time.perf_counter() - t0)

    return asyncio.run(main())


def run(model: ModelConfig, tokens: int, runs: int, first_tokens: int, say: Callable[[str], None]) -> dict[str, Any]:
    import httpx

    sup = PrivateSupervisor(model)
    gw = PrivateGateway(sup)
    out: dict[str, Any] = {"model": model.name, "machine": machine(), "tokens": tokens, "runs": runs,
                           "date": time.strftime("%Y-%m-%d")}
    try:
        http = RawHttp(gw.url)
        with Client(sup.endpoint, timeout=600) as direct:
            say(f"loading {model.name}")
            direct.complete("warm", model=model.name, max_tokens=2)
            ttft: dict[str, list[float]] = {"direct": [], "http": []}
            tps: dict[str, list[float]] = {"direct": [], "http": []}
            for r in range(runs):
                say(f"run {r + 1} of {runs}")

                def first(side: str) -> None:
                    ask = (lambda p, n: _stream(direct, model.name, p, n)) if side == "direct" else (
                        lambda p, n: _http_stream(http, model.name, p, n))
                    ask(f"{PROMPT} (warm {r})", 2)
                    for j in range(first_tokens):
                        t0, stamps = ask(f"{PROMPT} ({r}.{j})", 2)
                        ttft[side].append((stamps[0] - t0) * 1000)

                def stream(side: str) -> None:
                    if side == "direct":
                        _, stamps = _stream(direct, model.name, f"{PROMPT} (stream {r})", tokens)
                    else:
                        _, stamps = _http_stream(http, model.name, f"{PROMPT} (stream {r})", tokens)
                    tps[side].append(_decode_tps(stamps))

                _alternately(r, [("direct", lambda: first("direct")), ("http", lambda: first("http"))])
                _alternately(r, [("direct", lambda: stream("direct")), ("http", lambda: stream("http"))])
            for side in ("direct", "http"):
                out[f"ttft_ms_{side}"] = round(statistics.median(ttft[side]), 1)
                out[f"tokens_per_s_{side}"] = round(statistics.median(tps[side]), 1)
            out["ttft_added_ms"] = round(out["ttft_ms_http"] - out["ttft_ms_direct"], 1)
            out["tokens_per_s_ratio"] = round(out["tokens_per_s_http"] / out["tokens_per_s_direct"], 3)
        http.close()

        say("short requests (a fake model: the gateway's own cost)")
        clients, per_client = 8, 40

        async def direct_client(c: int) -> None:
            async with AsyncClient(sup.endpoint, timeout=60) as ac:
                for i in range(per_client):
                    await ac.complete(f"short {c}.{i}", model=FAKE, max_tokens=1)

        async def http_client(c: int) -> None:
            async with httpx.AsyncClient(timeout=60) as ah:
                for i in range(per_client):
                    resp = await ah.post(gw.url + "/v1/completions",
                                         json={"model": FAKE, "prompt": f"short {c}.{i}", "max_tokens": 1})
                    resp.raise_for_status()

        out["requests_per_s_direct"] = round(_requests_per_s(direct_client, clients, per_client), 1)
        out["requests_per_s_http"] = round(_requests_per_s(http_client, clients, per_client), 1)
    finally:
        gw.close()
        sup.close()
    return out


def table(res: dict[str, Any]) -> str:
    rows = [
        ("warm time to first token, median (ms)", res["ttft_ms_direct"], res["ttft_ms_http"],
         f"+{res['ttft_added_ms']} ms (target <= +3)"),
        ("streaming tokens/s, median", res["tokens_per_s_direct"], res["tokens_per_s_http"],
         f"{res['tokens_per_s_ratio']}x (target >= 0.97)"),
        ("short requests/s, 8 clients (fake model)", res["requests_per_s_direct"], res["requests_per_s_http"],
         f"{res['requests_per_s_http'] / res['requests_per_s_direct']:.2f}x"),
    ]
    lines = [f"model {res['model']}, {res['machine']}, {res['date']}, {res['runs']} runs, {res['tokens']} tokens",
             "| measure | ZeroMQ client | HTTP gateway | gateway vs direct |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)
