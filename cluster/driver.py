"""`stoker batch --ray`: the driver. It makes sure every Ray node with the `stoker` resource has a
stoker (a StokerNode actor pinned there, which uses the node's service or starts one), sends the
items in chunks as stateless Ray tasks pinned to the nodes that have their model, and writes
each chunk's lines to OUTPUT itself as the results come back: so the skip-done resume, the lock
and per-item errors are exactly those of `stoker batch`.

Failures: a chunk whose task fails (its node died or was removed, its stoker did not answer) is
sent again to another node; Ray's own task retries are off, so a chunk is never run twice at
once. A node whose tasks fail MAX_NODE_FAILURES times in a row gets no more work. Each item
without a seed gets one from its id (unless the command gives --seed), so a chunk run again
gives the same texts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, fields
from typing import Any, Callable

from stoker.supervisor.batch import Item, Output, Progress, run_item
from stoker.supervisor.bench import toml_value
from stoker.supervisor.config import Config, ModelConfig

RESOURCE = "stoker"  # the custom resource that marks a node as one that runs a stoker
CHUNK = 20  # items per task
MAX_NODE_FAILURES = 3
MAX_CHUNK_ATTEMPTS = 3  # a chunk that failed this often is split; one item that did, fails
IN_FLIGHT_PER_NODE = 2  # chunks at once per node: one running, one queued behind it


class ClusterError(RuntimeError):
    """The job cannot run on this cluster (no node with a stoker, none with the model)."""


def models_toml(config: Config) -> str:
    """The configuration's models (not the demo one, which every stoker adds itself) as TOML, for
    the stokers the driver starts on the nodes."""
    out = []
    for m in config.models.values():
        if m.demo:
            continue
        out.append(f'[models."{m.name}"]')
        for f in fields(ModelConfig):
            value = getattr(m, f.name)
            if f.name not in ("name", "demo") and value != f.default:
                out.append(f"{f.name} = {toml_value(value)}")
        out.append("")
    return "\n".join(out)


def run_chunk(endpoint: str, items: list[tuple[int, Any, dict]], defaults: dict[str, Any],
              embed: bool = False, part: str | None = None) -> list[dict[str, Any]]:
    """The Ray task: run the items on the stoker at `endpoint` (this node's), all at once (its fair
    queue orders them), or, for `stoker embed`, as one embed request; their output lines. A
    stoker that does not answer fails the task. With `part` (a path on storage every node
    reaches), the lines go to that file instead, whole (written aside, then renamed), and the
    task returns only what the driver counts: an id and, for a failure, its error."""
    if part is not None:
        records = run_chunk(endpoint, items, defaults, embed)
        write_part(part, records)
        return [{"id": r["id"], **({"error": r["error"]} if "error" in r else {}),
                 **({"usage": r["usage"]} if "usage" in r else {})} for r in records]
    from stoker.protocol.async_client import AsyncClient
    from stoker.supervisor.embed_job import embed_group

    async def main() -> list[dict[str, Any]]:
        async with AsyncClient(endpoint, timeout=30) as client:
            progress = Progress(total=len(items))
            chunk = [Item(*i) for i in items]
            if embed:
                return await embed_group(chunk, client, defaults, progress)
            return list(await asyncio.gather(*(run_item(i, client, defaults, progress) for i in chunk)))

    return asyncio.run(main())


def write_part(path: str, records: list[dict[str, Any]]) -> None:
    """A chunk's lines as one file, all or nothing: the same chunk run again (its node died after
    writing) replaces it, so no id is in two parts of one run."""
    import json

    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def part_files(folder: str) -> list[str]:
    """A parts folder's files, oldest run first (a later run's line of an id wins)."""
    import glob

    return sorted(glob.glob(os.path.join(folder, "part-*.jsonl")),
                  key=lambda p: (os.path.basename(p).split("-")[1], p))


def read_parts(folder: str) -> tuple[dict[Any, bool], list[str]]:
    """What a parts folder holds: id -> succeeded (a later run's line wins), as read_output."""
    import json

    results: dict[Any, bool] = {}
    for path in part_files(folder) if os.path.isdir(folder) else []:
        with open(path, encoding="utf-8") as f:
            for line in f:
                obj = json.loads(line)
                results[obj["id"]] = "error" not in obj
    return results, []


class PartsFolder:
    """OUTPUT as a folder of part files the tasks write; the driver only holds its lock."""

    def __init__(self, folder: str) -> None:
        import fcntl

        from stoker.supervisor.batch import OutputBusy

        os.makedirs(folder, exist_ok=True)
        self.fd = os.open(os.path.join(folder, ".lock"), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise OutputBusy(f"{folder} is being written by another stoker batch") from None

    def write(self, record: dict[str, Any]) -> None:
        raise RuntimeError("a parts folder is written by the tasks")

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Node:
    node_id: str
    actor: Any
    endpoint: str
    models: list[str]
    failures: int = 0
    running: int = 0


def check_address(address: str, timeout: float = 5.0) -> None:
    """A cluster's HOST:PORT (or ray://HOST:PORT) must answer, else ClusterError at once: Ray's
    own client retries an address that does not answer for minutes, saying nothing useful."""
    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[1] if "://" in address else address
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--ray {address!r} is not a Ray address: give HOST:PORT (a head node's, like "
                           "10.0.0.5:6379), or nothing for a Ray of its own")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ClusterError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start its head with "
                           "`ray start --head`, or leave the address out for a Ray of its own") from None


def start_nodes(config: Config, say: Callable[[str], None]) -> list[Node]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from stoker.cluster.node import StokerNode

    wanted = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(RESOURCE, 0) > 0]
    if not wanted:
        raise ClusterError(f"no live Ray node has the '{RESOURCE}' resource: start nodes with "
                           f"ray start --resources '{{\"{RESOURCE}\": 1}}'")
    actor_cls = ray.remote(num_cpus=0)(StokerNode)
    toml = models_toml(config)
    # STOKER_RAY_SERVICE=0: start a stoker of our own on every node even where a service answers
    # (tests, and a service with other models).
    service = os.environ.get("STOKER_RAY_SERVICE", "1") != "0"
    actors = [actor_cls.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                                max_restarts=0).remote(toml, config.supervisor.default_model, service)
              for n in wanted]
    nodes = []
    for n, actor in zip(wanted, actors):
        try:
            info = ray.get(actor.info.remote(), timeout=120)
        except Exception as exc:  # that node cannot run a stoker: the others still may
            say(f"node {n['NodeID'][:8]}: no stoker ({type(exc).__name__}: {exc}); skipped")
            continue
        nodes.append(Node(info["node_id"], actor, info["endpoint"], info["models"]))
        say(f"node {info['node_id'][:8]}: stoker at {info['endpoint']} "
            f"({'its own' if info['own'] else 'the service'}), models {', '.join(info['models'])}")
    if not nodes:
        raise ClusterError("no node could start a stoker")
    return nodes


def run_on_ray(items: list[Item], output: Output, config: Config, defaults: dict[str, Any], progress: Progress,
               on_change: Callable[[], None], address: str | None, say: Callable[[str], None],
               embed: bool = False, chunk_size: int = CHUNK, parts: str | None = None) -> None:
    """`defaults`: what run_item adds to each item (or, with `embed`, the embed request's keys).
    `parts`: a folder every node reaches, where each task writes its chunk's file (`output` is
    then not written)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False, "include_dashboard": False}
    try:
        if address:
            check_address(address)
            ray.init(address=address, **quiet)
        else:  # a Ray of our own, for this run (address "local": even beside a running cluster)
            ray.init(address="local", resources={RESOURCE: 1}, **quiet)
    except (ValueError, ConnectionError, TimeoutError) as exc:  # Ray's ways of saying "not there"
        raise ClusterError(f"cannot join the Ray cluster at {address}: {exc}" if address
                           else f"cannot start a Ray of its own: {exc}") from None
    try:
        nodes = {n.node_id: n for n in start_nodes(config, say)}
        known = {m for n in nodes.values() for m in n.models}  # what the cluster had at the start
        attempts: dict[tuple[int, int], int] = {}  # (first line, size) of a chunk -> runs that failed
        task = ray.remote(num_cpus=0, max_retries=0)(run_chunk)
        default_model = config.supervisor.default_model
        chunks: deque[list[Item]] = deque(items[i:i + chunk_size] for i in range(0, len(items), chunk_size))
        in_flight: dict[Any, tuple[list[Item], str]] = {}

        def model_of(item: Item) -> str:
            return item.request.get("model") or defaults.get("model") or default_model

        run_id = time.strftime("%Y%m%d%H%M%S")

        def write(records: list[dict[str, Any]]) -> None:
            for record in records:
                if parts is None:
                    output.write(record)
                progress.count(record)
                progress.tokens += int(record.get("usage", {}).get("completion_tokens", 0))  # (embeds: none)
            on_change()

        while chunks or in_flight:
            while chunks:
                chunk = chunks[0]
                model = model_of(chunk[0])
                # A chunk's items share a model (split where they do not): the nodes that have it.
                same = [i for i in chunk if model_of(i) == model]
                if len(same) < len(chunk):
                    chunks[0] = same
                    chunks.insert(1, [i for i in chunk if model_of(i) != model])
                    chunk = same
                able = [n for n in nodes.values() if model in n.models]
                if not able and model in known:
                    # Its nodes are gone: a later run (once they are back) does these items.
                    raise ClusterError(f"no node with model '{model}' is left")
                if not able:
                    chunks.popleft()
                    everywhere = sorted({m for n in nodes.values() for m in n.models})
                    errors = [{"id": i.id, "error": {"code": "unknown_model", "message": (
                        f"no node of the cluster has model '{model}' (they have: {', '.join(everywhere)})")}}
                        for i in chunk]
                    if parts is not None:
                        write_part(os.path.join(parts, f"part-{run_id}-{chunk[0].line}.jsonl"), errors)
                    write(errors)
                    continue
                node = min(able, key=lambda n: n.running)
                if node.running >= IN_FLIGHT_PER_NODE:
                    break
                chunks.popleft()
                ref = task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)).remote(
                    node.endpoint, [(i.line, i.id, i.request) for i in chunk], defaults, embed,
                    None if parts is None else os.path.join(parts, f"part-{run_id}-{chunk[0].line}.jsonl"))
                in_flight[ref] = (chunk, node.node_id)
                node.running += 1
            if not in_flight:
                if chunks and not nodes:
                    raise ClusterError("every node with a stoker failed; run the same command again to continue")
                continue
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for ref in done:
                chunk, node_id = in_flight.pop(ref)
                node = nodes.get(node_id)
                if node is not None:
                    node.running -= 1
                try:
                    records = ray.get(ref)
                except Exception as exc:  # the node died or was removed, its stoker did not answer
                    key = (chunk[0].line, len(chunk))
                    attempts[key] = attempts.get(key, 0) + 1
                    if attempts[key] < MAX_CHUNK_ATTEMPTS:
                        chunks.appendleft(chunk)
                    elif len(chunk) > 1:  # it fails wherever it goes: halves, to find the item at fault
                        half = len(chunk) // 2
                        chunks.appendleft(chunk[half:])
                        chunks.appendleft(chunk[:half])
                    else:
                        write([{"id": chunk[0].id, "error": {"code": "worker_crashed", "message": (
                            f"its task failed on {attempts[key]} nodes ({type(exc).__name__}: {exc})")}}])
                    if node is not None:
                        node.failures += 1
                        alive = any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())
                        if not alive or node.failures >= MAX_NODE_FAILURES:
                            del nodes[node_id]
                            say(f"node {node_id[:8]}: {'gone' if not alive else 'failing'} "
                                f"({type(exc).__name__}); no more work for it")
                    continue
                if node is not None:
                    node.failures = 0
                write(records)
        for node in nodes.values():
            try:
                ray.get(node.actor.stop.remote(), timeout=60)
            except Exception:
                pass
    finally:
        ray.shutdown()
