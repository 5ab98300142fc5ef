"""`stoker bench`: what the supervisor costs, measured beside what it is compared with, in one run.

- The model in-process (llama-cpp-python in a child process: same file, parameters and threads)
  against the same model through a private supervisor: decode tokens/s, warm time to first
  token, and cold start (request to first token with the model unloaded, against constructing
  `Llama` plus the first token).
- The supervisor's own capacity with the `fake` backend at full speed, against a bare pyzmq
  ROUTER relay that forwards the same fake tokens, as the ceiling.
- RSS of the supervisor, of its worker, and of the in-process model.

Runs alternate between the two sides so that drift on a shared machine hits both; the model is
compared run by run (the median of the runs' ratios), the rest by medians.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import msgpack
import psutil
import zmq

from stoker.protocol.results import Status
from stoker.protocol.client import Client, Token
from stoker.supervisor.config import ModelConfig
from stoker.supervisor.resources import threads_per_worker, usable_cores

FAKE = "bench-fake"
PROMPT = "Write a short story about a stoker who keeps a steam engine running through the night."


@dataclass(frozen=True)
class BenchSettings:
    tokens: int = 128
    clients: int = 4
    runs: int = 7
    first_tokens: int = 8  # warm first-token requests per side per run
    capacity_requests: int = 300  # fake requests of capacity_tokens each, for tokens/s
    capacity_tokens: int = 64
    rate_requests: int = 2000  # 1-token requests, for requests/s (enough to outweigh connecting)


QUICK = BenchSettings(tokens=16, clients=2, runs=1, first_tokens=2, capacity_requests=20, capacity_tokens=16,
                      rate_requests=100)


@dataclass
class Results:
    model: str
    machine: str
    settings: dict[str, Any]
    values: dict[str, float] = field(default_factory=dict)

    def targets(self) -> list[tuple[str, str, bool]]:
        """(target, measured, met) for the issue's targets."""
        v = self.values
        rows = [
            ("streaming >= 0.98 x in-process", f"{v['decode_ratio']:.3f} x", v["decode_ratio"] >= 0.98),
            ("warm TTFT overhead <= 2 ms (median)", f"{v['ttft_overhead_ms']:+.1f} ms", v["ttft_overhead_ms"] <= 2),
            ("cold start overhead <= 150 ms", f"{v['cold_overhead_ms']:+.0f} ms", v["cold_overhead_ms"] <= 150),
            ("capacity >= 50% of a bare relay", f"{v['capacity_ratio']:.0%}", v["capacity_ratio"] >= 0.5),
            ("supervisor RSS < 80 MB", f"{v['supervisor_rss_mb']:.0f} MB", v["supervisor_rss_mb"] < 80),
            ("worker RSS within 30 MB of in-process", f"{v['worker_rss_mb'] - v['inprocess_rss_mb']:+.0f} MB",
             abs(v["worker_rss_mb"] - v["inprocess_rss_mb"]) <= 30),
        ]
        return rows


def machine() -> str:
    mem = psutil.virtual_memory().total / 2**30
    return f"{usable_cores()} cores, {mem:.0f} GiB, {os.uname().machine}, Python {sys.version.split()[0]}"


# ---- the in-process side -------------------------------------------------------------------------

def _inprocess(conn: Any, model: dict[str, Any], threads: int) -> None:
    """A child process holding the model in-process; answers commands over a pipe."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)  # llama.cpp's messages: the worker's go to its log, these nowhere
    import llama_cpp

    def load() -> tuple[Any, float]:
        t0 = time.perf_counter()
        llm = llama_cpp.Llama(model["path"], n_ctx=model["n_ctx"], n_gpu_layers=model["n_gpu_layers"],
                              n_threads=threads, n_threads_batch=threads, verbose=False)
        return llm, time.perf_counter() - t0

    llm = None
    while True:
        cmd, arg = conn.recv()
        if cmd == "load":
            del llm
            llm, seconds = load()
            conn.send(seconds)
        elif cmd == "generate":
            prompt, n = arg
            t0 = time.perf_counter()
            stamps = []
            for _ in llm.create_completion(prompt, max_tokens=n, temperature=0.0, seed=0, stream=True):
                stamps.append(time.perf_counter())
            conn.send((t0, stamps))
        elif cmd == "rss":
            conn.send(psutil.Process().memory_info().rss)
        else:
            conn.send(None)
            return


class InProcess:
    def __init__(self, model: ModelConfig, threads: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_inprocess, args=(child, asdict(model), threads), daemon=True)
        self.proc.start()

    def ask(self, cmd: str, arg: Any = None) -> Any:
        self.conn.send((cmd, arg))
        return self.conn.recv()

    def close(self) -> None:
        try:
            self.ask("stop")
        except (EOFError, OSError):
            pass
        self.proc.join(10)
        self.conn.close()


# ---- the supervisor side ------------------------------------------------------------------------

class PrivateSupervisor:
    """A supervisor of our own (own socket, state, config) with the model and a fast fake."""

    def __init__(self, model: ModelConfig, *more: ModelConfig) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="stoker-bench-", dir="/tmp" if os.path.isdir("/tmp") else None))
        self.endpoint = f"ipc://{self.folder}/s.sock"
        lines = ["[supervisor]", f'endpoint = "{self.endpoint}"', f'state_dir = "{self.folder / "state"}"',
                 "max_queue = 100000", "idle_timeout = 3600"]
        for m in (model, *more):
            lines += ["", f'[models."{m.name}"]']
            for f in fields(ModelConfig):
                value = getattr(m, f.name)
                if f.name not in ("name", "demo") and value != f.default:
                    lines.append(f"{f.name} = {toml_value(value)}")
        lines += ["", f"[models.{FAKE}]", 'backend = "fake"', "end_every = 0"]
        (self.folder / "config.toml").write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([sys.executable, "-m", "stoker.supervisor", "serve", "--quiet",
                                      "--config", str(self.folder / "config.toml")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with Client(self.endpoint) as c:
                    c.ping(timeout=0.5)
                return
            except Exception:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the bench supervisor exited; see {self.folder / 'state'}") from None
                time.sleep(0.1)
        raise RuntimeError("the bench supervisor did not start")

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def close(self) -> None:
        try:
            with Client(self.endpoint, timeout=10) as c:
                c.shutdown()
            self.proc.wait(60)
        except Exception:
            self.proc.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def _stream(client: Client, model: str, prompt: str, n: int) -> tuple[float, list[float]]:
    """Send a greedy request; the send time and the arrival time of each token."""
    t0 = time.perf_counter()
    stamps = []
    for ev in client.stream(prompt, model=model, max_tokens=n, temperature=0.0, seed=0):
        if isinstance(ev, Token):
            now = time.perf_counter()
            stamps += [now] * ev.n
    return t0, stamps


def _decode_tps(stamps: list[float]) -> float:
    """Tokens after the first arrival over the time since it. Tokens that came in one frame share
    a stamp: those of the first frame are not counted, since no time was spent on them."""
    later = [t for t in stamps if t > stamps[0]] if stamps else []
    return len(later) / (stamps[-1] - stamps[0]) if later else 0.0


def _first_tokens(ask: Callable[[str, int], tuple[float, list[float]]], run: int, n: int) -> list[float | None]:
    """Seconds to the first token of n short requests in a row on one side (None: no token),
    after one untimed request. A process that runs right after the other side's is 7 to 13 ms
    slower to its first token (measured with two in-process children; why is not), so only the
    requests after it are timed: a process as warm as one serving request after request."""
    ask(f"{PROMPT} (first token {run})", 2)
    times: list[float | None] = []
    for j in range(n):
        t0, stamps = ask(f"{PROMPT} (first token {run}.{j})", 2)
        times.append(stamps[0] - t0 if stamps else None)
    return times


def _alternately(run: int, sides: list[tuple[str, Callable[[], Any]]]) -> dict[str, Any]:
    """Each side's result, the sides called in turn: in reverse order on odd runs."""
    return {side: call() for side, call in (sides if run % 2 == 0 else reversed(sides))}


# ---- capacity: fake tokens through stoker, and through a bare relay ------------------------------

def _producer(endpoint: str, tokens: int) -> None:
    """The relay's model: the fake backend's tokens, one frame each, as fast as it makes them."""
    from stoker.workers.backend import GenerationRequest
    from stoker.workers.fake_backend import FakeBackend

    backend = FakeBackend(ModelConfig(name=FAKE, backend="fake", end_every=0))
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send(b"ready")
    while True:
        client, frame = sock.recv_multipart()
        req = msgpack.unpackb(frame)
        gen = backend.generate(GenerationRequest(req["prompt"], None, req["max_tokens"], {}))
        for seq, chunk in enumerate(gen.chunks()):
            sock.send_multipart([client, msgpack.packb({"v": 1, "id": req["id"], "ev": "token", "seq": seq,
                                                        "n": chunk.n, "text": chunk.text})])
        sock.send_multipart([client, msgpack.packb({"v": 1, "id": req["id"], "ev": "end", "reason": "length"})])


def _relay(front: str, back: str) -> None:
    """A bare ROUTER-to-ROUTER relay, in a process of its own like the supervisor: what any
    broker in front of a model must do at least. Runs until killed."""
    ctx = zmq.Context()
    frontend, backend = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    for sock in (frontend, backend):
        # A ROUTER drops what it cannot deliver at once (a full pipe, by default 1000 frames):
        # with a client slower than the relay, ends were lost and the run waited forever, and
        # dropped tokens would not count. No bound, and an error instead of a silent drop.
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    frontend.bind(front)
    backend.bind(back)
    producer, _ = backend.recv_multipart()
    poller = zmq.Poller()
    poller.register(frontend, zmq.POLLIN)
    poller.register(backend, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            if sock is frontend:
                client, frame = frontend.recv_multipart()
                backend.send_multipart([producer, client, frame])
            else:
                _, client, frame = backend.recv_multipart()
                frontend.send_multipart([client, frame])


def _load(endpoint: str, clients: int, requests: int, tokens: int) -> tuple[float, float]:
    """`clients` DEALERs pipelining `requests` fake requests between them; (tokens/s, requests/s)."""
    per = max(1, requests // clients)
    got = [0] * clients
    done = [0] * clients

    def one(i: int) -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        for j in range(per):
            sock.send(msgpack.packb({"v": 1, "op": "generate", "id": j, "model": FAKE,
                                     "prompt": f"client {i} request {j}", "max_tokens": tokens}))
        while done[i] < per:
            msg = msgpack.unpackb(sock.recv())
            if msg["ev"] == "token":
                got[i] += msg["n"]
            elif msg["ev"] in ("end", "error"):
                done[i] += 1
        sock.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return sum(got) / elapsed, sum(done) / elapsed


def _relay_load(folder: Path, clients: int, requests: int, tokens: int) -> tuple[float, float]:
    front, back = f"ipc://{folder}/relay-front.sock", f"ipc://{folder}/relay-back.sock"
    ctx = multiprocessing.get_context("spawn")
    relay = ctx.Process(target=_relay, args=(front, back), daemon=True)
    relay.start()
    producer = ctx.Process(target=_producer, args=(back, tokens), daemon=True)
    producer.start()
    time.sleep(1.0)  # both started (a spawned interpreter) and connected
    try:
        return _load(front, clients, requests, tokens)
    finally:
        for proc in (producer, relay):
            proc.kill()
            proc.join(5)


# ---- the whole run --------------------------------------------------------------------------------

def run(model: ModelConfig, settings: BenchSettings, say: Callable[[str], None]) -> Results:
    if model.backend != "llama":
        raise ValueError(f"model '{model.name}' is not a llama model: bench compares it with llama-cpp-python")
    if model.demo:
        from stoker.workers.demo_model import ensure_demo_file

        ensure_demo_file()
    threads = threads_per_worker(model.n_threads, model.replicas, usable_cores())
    results = Results(model.name, machine(), asdict(settings))
    sup = PrivateSupervisor(model)
    inproc: InProcess | None = None
    try:
        v = results.values
        cold_s, cold_i, tps_s, tps_i, first_s, first_i = [], [], [], [], [], []
        run_overheads: list[float] = []
        with Client(sup.endpoint, timeout=120) as c:
            # Each run starts new processes on both sides: how fast one process runs the model
            # differs by a few percent from the next (why is not measured), which is more than
            # what is measured, and the same pair run again repeats its difference.
            for r in range(settings.runs + 1):  # run 0 warms caches and first-time costs: not counted
                c.unload(model.name)
                if inproc is not None:
                    inproc.close()
                inproc = InProcess(model, threads)
                # Wait until its interpreter has started and imported llama_cpp, so that no timing
                # below shares the CPU with that.
                inproc.ask("rss")
                prompt = f"{PROMPT} (run {r})"
                # Not a prefix of the warm prompt, which would then reuse its cache and evaluate
                # one token instead of the prompt's end.
                cold_prompt = f"{PROMPT} (cold {r})"
                side_i: InProcess = inproc

                def stoker_cold() -> float | None:
                    t0, stamps = _stream(c, model.name, cold_prompt, 2)
                    return stamps[0] - t0 if stamps else None

                def inprocess_cold() -> float | None:
                    load_s = side_i.ask("load")
                    t0, stamps = side_i.ask("generate", (cold_prompt, 2))
                    return load_s + stamps[0] - t0 if stamps else None

                colds = [("stoker", stoker_cold), ("in-process", inprocess_cold)]
                got_cold = _alternately(r, colds)
                warms = [("stoker", lambda: _stream(c, model.name, prompt, settings.tokens)),
                         ("in-process", lambda: side_i.ask("generate", (prompt, settings.tokens)))]
                got = _alternately(r, warms)
                firsts = [("stoker", lambda: _first_tokens(lambda p, n: _stream(c, model.name, p, n), r,
                                                          settings.first_tokens)),
                          ("in-process", lambda: _first_tokens(lambda p, n: side_i.ask("generate", (p, n)), r,
                                                               settings.first_tokens))]
                got_first = _alternately(r, firsts)
                say(f"run {r}/{settings.runs}" if r else "warm-up run")
                if r == 0:
                    continue
                pairs = [(s, i) for s, i in zip(got_first["stoker"], got_first["in-process"])
                         if s is not None and i is not None]
                if pairs:
                    first_s += [s for s, _ in pairs]
                    first_i += [i for _, i in pairs]
                    run_overheads.append(statistics.median((s - i) * 1000 for s, i in pairs))
                if None in got_cold.values() or not all(_decode_tps(stamps) for _, stamps in got.values()):
                    continue  # pairs only: a side with no tokens would skew the other's median
                cold_s.append(got_cold["stoker"])
                cold_i.append(got_cold["in-process"])
                for side, (t0, stamps) in got.items():
                    (tps_s if side == "stoker" else tps_i).append(_decode_tps(stamps))
            if not tps_s or not first_s:
                raise RuntimeError(f"model '{model.name}' ended its generations before a second token in every "
                                   "run on one side or the other; nothing to compare")
            v["decode_tps_stoker"] = statistics.median(tps_s)
            v["decode_tps_inprocess"] = statistics.median(tps_i)
            v["ttft_ms_stoker"] = statistics.median(first_s) * 1000
            v["ttft_ms_inprocess"] = statistics.median(first_i) * 1000
            # Compared run by run: the two sides of one run ran back to back, so what a shared
            # machine does over minutes cancels out of their ratio (and their difference).
            ratios = [s / i for s, i in zip(tps_s, tps_i)]
            v["decode_ratio"] = statistics.median(ratios)
            v["decode_ratio_min"], v["decode_ratio_max"] = min(ratios), max(ratios)
            # The j-th request of one side against the j-th of the other, in the same run.
            v["ttft_overhead_ms"] = statistics.median((s - i) * 1000 for s, i in zip(first_s, first_i))
            v["ttft_overhead_ms_min"], v["ttft_overhead_ms_max"] = min(run_overheads), max(run_overheads)
            v["ttft_pairs"] = len(first_s)
            v["cold_ms_stoker"] = statistics.median(cold_s) * 1000
            v["cold_ms_inprocess"] = statistics.median(cold_i) * 1000
            v["cold_overhead_ms"] = v["cold_ms_stoker"] - v["cold_ms_inprocess"]
            workers = [w for w in Status.from_data(c.status()).workers if w.model == model.name]
            v["worker_rss_mb"] = workers[0].rss_bytes / 1e6 if workers else 0.0
            assert inproc is not None
            v["inprocess_rss_mb"] = inproc.ask("rss") / 1e6

            c.load(FAKE)
        inproc.close()  # the capacity runs do not share the machine with an in-process model
        say("capacity with the fake backend")
        cap_s, cap_r, cap_c, rps_s, rps_r = [], [], [], [], []
        for r in range(settings.runs):
            tokens_s, _ = _load(sup.endpoint, 1, settings.capacity_requests, settings.capacity_tokens)
            tokens_r, _ = _relay_load(sup.folder, 1, settings.capacity_requests, settings.capacity_tokens)
            tokens_c, _ = _load(sup.endpoint, settings.clients, settings.capacity_requests, settings.capacity_tokens)
            _, req_s = _load(sup.endpoint, settings.clients, settings.rate_requests, 1)
            _, req_r = _relay_load(sup.folder, settings.clients, settings.rate_requests, 1)
            cap_s.append(tokens_s)
            cap_r.append(tokens_r)
            cap_c.append(tokens_c)
            rps_s.append(req_s)
            rps_r.append(req_r)
        v["capacity_tokens_s"] = statistics.median(cap_s)
        v["relay_tokens_s"] = statistics.median(cap_r)
        v["capacity_tokens_s_clients"] = statistics.median(cap_c)
        v["capacity_ratio"] = v["capacity_tokens_s"] / v["relay_tokens_s"]
        v["requests_s"] = statistics.median(rps_s)
        v["relay_requests_s"] = statistics.median(rps_r)
        v["supervisor_rss_mb"] = sup.rss() / 1e6
    finally:
        if inproc is not None and inproc.proc.is_alive():
            inproc.proc.kill()
        sup.close()
    return results


def table(results: Results) -> str:
    v = results.values
    rows = [
        ("decode tokens/s", f"{v['decode_tps_stoker']:.1f}", f"{v['decode_tps_inprocess']:.1f}",
         f"{v['decode_ratio']:.3f} x ({v['decode_ratio_min']:.3f} to {v['decode_ratio_max']:.3f})"),
        ("warm time to first token", f"{v['ttft_ms_stoker']:.1f} ms", f"{v['ttft_ms_inprocess']:.1f} ms",
         f"{v['ttft_overhead_ms']:+.1f} ms ({v['ttft_overhead_ms_min']:+.1f} to {v['ttft_overhead_ms_max']:+.1f})"),
        ("cold start to first token", f"{v['cold_ms_stoker']:.0f} ms", f"{v['cold_ms_inprocess']:.0f} ms",
         f"{v['cold_overhead_ms']:+.0f} ms"),
        ("RSS (worker / model in-process)", f"{v['worker_rss_mb']:.0f} MB", f"{v['inprocess_rss_mb']:.0f} MB",
         f"{v['worker_rss_mb'] - v['inprocess_rss_mb']:+.0f} MB"),
        ("fake tokens/s, 1 client (vs bare relay)", f"{v['capacity_tokens_s']:.0f}", f"{v['relay_tokens_s']:.0f}",
         f"{v['capacity_ratio']:.0%}"),
        (f"fake tokens/s, {results.settings['clients']} clients", f"{v['capacity_tokens_s_clients']:.0f}", "", ""),
        (f"requests/s, {results.settings['clients']} clients (vs bare relay)", f"{v['requests_s']:.0f}",
         f"{v['relay_requests_s']:.0f}", f"{v['requests_s'] / v['relay_requests_s']:.0%}"),
        ("supervisor RSS", f"{v['supervisor_rss_mb']:.0f} MB", "", ""),
    ]
    head = ("", "stoker", "in-process / relay", "difference")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = [f"stoker bench: model {results.model}; {results.machine}; "
             f"{results.settings['runs']} runs, medians, {results.settings['tokens']} tokens",
             f"(decode: the median and range of each run's stoker against the in-process run beside it; "
             f"warm first token: the median of {v['ttft_pairs']:.0f} pairs of requests, {results.settings['first_tokens']} "
             "per side in a row in each run, and the range of the runs' medians)"]
    for row in [head, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    lines.append("")
    lines.append("targets:")
    for target, measured, met in results.targets():
        lines.append(f"  [{'met' if met else 'NOT met'}] {target}: {measured}")
    return "\n".join(lines)
