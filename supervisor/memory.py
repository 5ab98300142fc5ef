"""What a model costs in memory before its worker starts: read from its GGUF file.

A worker holds the weights, the KV cache for its context (n_ctx cells for each of its `parallel`
sequences), llama.cpp's compute buffers for one batch, and the process itself (Python, ZeroMQ, the native libraries). Layers offloaded with
`n_gpu_layers` move their share of weights and cache to the GPU.

The GGUF header is scanned here rather than with `gguf.GGUFReader`: the reader decodes every
metadata array into numpy (262,144 tokenizer strings for Gemma 3), which takes 8 s and 700 MB in
the supervisor. The `gguf` package still supplies the format's tables (value types and the block
size of each tensor type), so new quantisation types come with it.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from stoker.supervisor.sizes import format_size

if TYPE_CHECKING:
    from stoker.supervisor.config import ModelConfig

MiB = 1024 * 1024
# The process before it loads a model, until a worker of that backend reports its own: measured
# on the 2-core CI machine (Python 3.11; llama-cpp-python 0.3 imported, or the fake backend).
DEFAULT_OVERHEAD = {"llama": 48 * MiB, "fake": 36 * MiB}
N_UBATCH = 512  # llama-cpp-python's default batch: the compute buffers are sized for it
_KV_BYTES = 2  # f16 cache entries
_MAX_ARRAY_DEPTH = 8  # real files nest at most 2


@dataclass(frozen=True)
class Cost:
    """Bytes of RAM and of GPU memory."""

    ram: int = 0
    vram: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.ram + other.ram, self.vram + other.vram)

    def __sub__(self, other: "Cost") -> "Cost":
        return Cost(self.ram - other.ram, self.vram - other.vram)

    def within(self, limit: "Cost") -> bool:
        return self.ram <= limit.ram and self.vram <= limit.vram


@dataclass(frozen=True)
class GgufFacts:
    """What the estimate needs from a GGUF file."""

    architecture: str
    weights_bytes: int
    n_layer: int
    n_embd: int
    n_head: int
    kv_per_token: int  # cache elements per token over all layers (K and V)
    n_vocab: int


class GgufError(ValueError):
    """The file is not a GGUF this estimate can read."""


_FACTS_CACHE: dict[tuple[str, int, int], GgufFacts] = {}  # (path, size, mtime) -> facts
_FACTS_CACHE_SIZE = 64


def gguf_facts(path: str) -> GgufFacts:
    """The facts of a GGUF file. Only a regular file is read: it is opened without blocking (a
    FIFO would otherwise wait for a writer) and checked before it is mapped. Blocking I/O: the
    supervisor calls this off its event loop (see model_files)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise GgufError(f"{path} is not a regular file")
        key = (path, st.st_size, st.st_mtime_ns)
        facts = _FACTS_CACHE.get(key)
        if facts is None:
            facts = _read_facts(fd, path)
            if len(_FACTS_CACHE) >= _FACTS_CACHE_SIZE:
                _FACTS_CACHE.clear()
            _FACTS_CACHE[key] = facts
        return facts
    finally:
        os.close(fd)


def _read_facts(fd: int, path: str) -> GgufFacts:
    quant_sizes, quant_type = _gguf_tables()
    try:
        buf = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except ValueError:  # empty file
        raise GgufError(f"{path} is empty, not a GGUF file") from None
    with buf:
        try:
            return _parse(buf, path, quant_sizes, quant_type)
        except GgufError:
            raise
        except (struct.error, ValueError, TypeError, OverflowError, RecursionError, IndexError, KeyError) as exc:
            # Whatever a damaged or hostile header holds, the answer is one clear error.
            raise GgufError(f"{path}: malformed GGUF header ({type(exc).__name__}: {exc})") from None


def _parse(buf: mmap.mmap, path: str, quant_sizes: dict, quant_type: type) -> GgufFacts:
    reader = _Reader(buf, path)
    if buf[:4] != b"GGUF":
        raise GgufError(f"{path} is not a GGUF file (no GGUF magic)")
    reader.pos = 4
    version, n_tensors, n_kv = reader.unpack("<IQQ")
    if version < 2:
        raise GgufError(f"{path}: GGUF version {version} is too old")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = reader.string()
        meta[key] = reader.value(reader.unpack("<I")[0])
    weights = 0
    for _ in range(n_tensors):
        reader.string()
        (n_dims,) = reader.unpack("<I")
        dims = reader.unpack(f"<{n_dims}Q")
        kind, _offset = reader.unpack("<IQ")
        try:
            block, type_size = quant_sizes[quant_type(kind)]
        except (ValueError, KeyError):
            raise GgufError(f"{path}: tensor type {kind} is unknown to the installed gguf package") from None
        elements = 1
        for d in dims:
            elements *= d
        weights += elements // block * type_size
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise GgufError(f"{path}: no general.architecture in its metadata")

    def num(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise GgufError(f"{path}: no {arch}.{key} in its metadata")
        return value

    n_layer, n_embd, n_head = int(num("block_count")), int(num("embedding_length")), num("attention.head_count")
    n_head = max(n_head) if isinstance(n_head, list) else int(n_head)
    head_kv = num("attention.head_count_kv", n_head)
    per_layer = head_kv if isinstance(head_kv, list) else [head_kv] * n_layer
    key_len = int(num("attention.key_length", n_embd // max(1, n_head)))
    value_len = int(num("attention.value_length", key_len))
    tokens = meta.get("tokenizer.ggml.tokens", 0)
    n_vocab = int(meta.get(f"{arch}.vocab_size", tokens))
    return GgufFacts(arch, weights, n_layer, n_embd, n_head,
                     sum(int(h) for h in per_layer) * (key_len + value_len), n_vocab)


@lru_cache(maxsize=1)
def _gguf_tables() -> tuple[dict, type]:
    """The gguf package's tensor-type tables. Its constants module is loaded on its own: importing
    the package imports numpy, 18 MB the supervisor does not otherwise need."""
    import importlib.util

    spec = importlib.util.find_spec("gguf")
    if spec is None or not spec.submodule_search_locations:
        raise GgufError("the gguf package is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "constants.py")
    loader_spec = importlib.util.spec_from_file_location("stoker_gguf_constants", path)
    assert loader_spec is not None and loader_spec.loader is not None
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    return module.GGML_QUANT_SIZES, module.GGMLQuantizationType


class _Reader:
    """Little-endian GGUF fields from a mapped file. Arrays are counted, not decoded (their
    contents are not needed), except arrays of numbers, which per-layer values use."""

    # value type -> struct format (gguf.GGUFValueType numbering, fixed by the format)
    _SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    _STRING, _ARRAY = 8, 9

    def __init__(self, buf: mmap.mmap, path: str) -> None:
        self.buf, self.path, self.pos = buf, path, 0

    def unpack(self, fmt: str) -> tuple:
        try:
            values = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise GgufError(f"{self.path}: truncated GGUF header") from None
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (n,) = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise GgufError(f"{self.path}: truncated GGUF header")
        text = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return text

    def skip(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise GgufError(f"{self.path}: truncated GGUF header")
        self.pos += n

    def value(self, kind: int, depth: int = 0) -> Any:
        if kind in self._SCALARS:
            return self.unpack("<" + self._SCALARS[kind])[0]
        if kind == self._STRING:
            return self.string()
        if kind == self._ARRAY:
            if depth >= _MAX_ARRAY_DEPTH:
                raise GgufError(f"{self.path}: arrays nested deeper than {_MAX_ARRAY_DEPTH}")
            item, count = self.unpack("<IQ")
            if item in self._SCALARS:
                fmt = self._SCALARS[item]
                if count <= 4096:
                    return list(self.unpack(f"<{count}{fmt}"))
                self.skip(count * struct.calcsize(fmt))
                return count
            if item == self._STRING:
                for _ in range(count):  # skip each: an 8-byte length, then the bytes
                    (n,) = self.unpack("<Q")
                    self.skip(n)
                return count
            for _ in range(count):
                self.value(item, depth + 1)
            return count
        raise GgufError(f"{self.path}: unknown GGUF value type {kind}")


def gpu_share(n_gpu_layers: int, n_layer: int) -> float:
    """The share of the model's layers llama.cpp puts on the GPU (-1: all; the output layer is one)."""
    if n_gpu_layers == 0:
        return 0.0
    if n_gpu_layers < 0 or n_gpu_layers >= n_layer + 1:
        return 1.0
    return n_gpu_layers / (n_layer + 1)


def estimate_gguf(facts: GgufFacts, n_ctx: int, n_gpu_layers: int, overhead: int) -> Cost:
    """RAM and VRAM of a llama worker serving this GGUF with this context."""
    kv = n_ctx * facts.kv_per_token * _KV_BYTES
    # The compute buffers llama.cpp reserves are far larger than what it touches; what a batch
    # really writes is dominated by the attention scores (batch x context x heads) and the
    # activations of the batch.
    compute = N_UBATCH * n_ctx * facts.n_head * 4 + 16 * facts.n_embd * N_UBATCH * 4
    share = gpu_share(n_gpu_layers, facts.n_layer)
    on_gpu = int(share * (facts.weights_bytes + kv))
    gpu_compute = compute if share > 0 else 0
    ram = facts.weights_bytes + kv - on_gpu + (compute - gpu_compute) + overhead
    return Cost(ram=ram, vram=on_gpu + gpu_compute)


def needs_file(model: "ModelConfig") -> bool:
    """Whether the model's cost comes from its file (a llama model without memory_bytes)."""
    return model.backend == "llama" and not model.memory_bytes


def estimate(model: "ModelConfig", facts: GgufFacts | None, overhead: int | None = None,
             file_bytes: int = 0) -> Cost:
    """A model's cost before it loads. `memory_bytes` in its configuration wins; a fake model costs
    that plus the process; a llama model is estimated from its GGUF's facts. Without them (an
    unreadable header), it counts the file's size and the process."""
    base = DEFAULT_OVERHEAD.get(model.backend, 0) if overhead is None else overhead
    if not needs_file(model):
        return Cost(ram=model.memory_bytes + base)
    if facts is None:
        return Cost(ram=file_bytes + base)
    # With `parallel` sequences the worker's context holds n_ctx cells for each of them and the
    # prefix cache's (one pool they share), and its buffers are sized for that context.
    cells = model.n_ctx * model.parallel
    if model.parallel > 1 and model.share_prefixes:  # the batch engine's prefix cache has cells of its own
        cells += model.prefix_cache
    cost = estimate_gguf(facts, cells, model.n_gpu_layers, base)
    if model.embedding:
        # The embedding context (made at the first embed): its cells, and a row of logits per
        # token of a batch, which llama.cpp reserves (and writes) even though only the pooled
        # vectors are read: 512 tokens of Gemma 3's 262,144 words are 512 MiB.
        n = model.embedding_ctx
        cost = cost + Cost(ram=n * facts.kv_per_token * _KV_BYTES + n * facts.n_vocab * 4 + 16 * facts.n_embd * n * 4)
    return cost


@dataclass(frozen=True)
class Budget:
    """What workers may hold together; None = not limited (no GPU: VRAM is not budgeted)."""

    ram: int | None = None
    vram: int | None = None

    def fits(self, total: Cost) -> bool:
        return (self.ram is None or total.ram <= self.ram) and (self.vram is None or total.vram <= self.vram)

    def over(self, total: Cost) -> Cost:
        """How much of `total` does not fit (0 where it does)."""
        return Cost(0 if self.ram is None else max(0, total.ram - self.ram),
                    0 if self.vram is None else max(0, total.vram - self.vram))

    def describe(self, cost: Cost) -> str:
        """`cost` in words, naming only what is budgeted."""
        parts = [f"{format_size(cost.ram)} of RAM"]
        if self.vram is not None and cost.vram:
            parts.append(f"{format_size(cost.vram)} of GPU memory")
        return " and ".join(parts)
