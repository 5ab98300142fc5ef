"""Chaos: workers killed or frozen at random while 8 clients stream; nothing is lost or repeated."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from stoker.protocol.client import Client
from stoker.protocol.errors import Unreachable
from stoker.workers.fake_backend import complete

from .helpers import collect, raw_socket, send, text_of

MODELS = "\n".join(
    f'[models.c{i}]\nbackend = "fake"\ntokens_per_second = 400\nend_every = 0\nload_seconds = 0.1\n'
    for i in range(4)
)
CLIENTS, REQUESTS, TOKENS = 8, 20, 40


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["kill-9", "sigstop"])
def test_every_request_completes_exactly_while_workers_die_or_hang(start_supervisor, sig):
    sup = start_supervisor(models=MODELS, default_model="c0", worker_liveness=1.0)
    results: dict[tuple[int, int], tuple[str, dict]] = {}
    errors: list[BaseException] = []
    done = threading.Event()

    def client(i: int) -> None:
        try:
            sock = raw_socket(sup.endpoint)
            for j in range(REQUESTS):
                rid = f"{i}-{j}"
                send(sock, op="generate", id=rid, model=f"c{i % 4}", prompt=f"client {i} request {j}",
                     max_tokens=TOKENS, temperature=0)
                replies = collect(sock, {rid}, timeout=60)[rid]
                results[(i, j)] = (text_of(replies), replies[-1])  # text_of: seq with no gap or repeat
            sock.close()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    hits: list[int] = []

    def chaos() -> None:
        rng = random.Random(1)
        while not done.wait(0.5):
            try:
                with Client(sup.endpoint, timeout=5) as c:
                    ready = [w["pid"] for w in c.status()["workers"] if w["state"] in ("idle", "busy")]
            except Unreachable:
                continue
            if ready:
                pid = rng.choice(ready)
                try:
                    os.kill(pid, sig)
                    hits.append(pid)
                except ProcessLookupError:
                    pass

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    killer = threading.Thread(target=chaos)
    started = time.monotonic()
    for t in threads + [killer]:
        t.start()
    for t in threads:
        t.join(200)
    done.set()
    killer.join(10)
    assert not errors, errors[0]
    assert len(results) == CLIENTS * REQUESTS
    for (i, j), (text, end) in results.items():
        assert end["ev"] == "end" and end["reason"] == "length", ((i, j), end)
        assert end["usage"]["completion_tokens"] == TOKENS
        assert text == "".join(complete(f"client {i} request {j}", 0, TOKENS, 0)[0]), (i, j)
    log = sup.log()
    resumed = log.count("resuming request")
    print(f"chaos {signal.Signals(sig).name}: {len(hits)} workers hit, {resumed} requests resumed mid-stream, "
          f"{time.monotonic() - started:.1f} s")
    assert len(hits) >= 5 and resumed >= 1
    if sig == signal.SIGSTOP:
        assert "sent nothing for" in log
