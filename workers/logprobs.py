"""Log-probabilities of generated tokens (a generate's `logprobs: N`), in the protocol's shape.

Each token a request counts gets one entry, shaped as the OpenAI API's `logprobs.content`:
{"token": its text, "bytes": its UTF-8 bytes (a list of ints; a token may hold part of a
character, then `token` has U+FFFD), "logprob": the natural log of its probability under the
model's raw distribution (before temperature, top-k and the rest), "top_logprobs": the N most
likely tokens at that position, most likely first, each {"token", "bytes", "logprob"}}.

The llama figures are llama-cpp-python's own: `Llama.logits_to_logprobs` over the logits the
token was sampled from (a float32 log-softmax), here with numpy's argpartition instead of a
sort of the whole vocabulary in Python.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable

import numpy as np

from stoker.protocol.messages import Key

Entry = dict[str, Any]


def wanted(sampling: Any) -> int | None:
    """How many alternatives the request asks for; None if it asks for no log-probabilities."""
    n = sampling.get(Key.LOGPROBS)
    return None if n is None else int(n)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """As llama-cpp-python's Llama.logits_to_logprobs, so the figures are the same."""
    top = np.amax(logits)
    shifted = np.subtract(logits, top if np.isfinite(top) else 0, dtype=np.single)
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.sum(np.exp(shifted)))


def entry(text_bytes: bytes, logprob: float, top: list[Entry]) -> Entry:
    return {Key.TOKEN: text_bytes.decode("utf-8", "replace"), Key.BYTES: list(text_bytes),
            Key.LOGPROB: float(logprob), Key.TOP_LOGPROBS: top}


def of_logits(logits: np.ndarray, token: int, n: int, piece: Callable[[int], bytes]) -> Entry:
    """The entry of `token`, sampled from `logits`, with its `n` most likely alternatives."""
    lp = log_softmax(logits)
    best = sorted(top_ids(lp, n), key=lambda i: (-lp[i], i))  # ties in token order
    return entry(piece(token), float(lp[token]), [alt(piece(i), float(lp[i])) for i in best])


def top_ids(values: np.ndarray, n: int, width: int = 512) -> list[int]:
    """The indices of the `n` largest values, in no order. An argpartition of a 262,144-word
    vocabulary takes 2.4 ms; this, about 0.1: the n largest all lie in the n rows (of `width`
    values) with the largest maxima, so only those rows are partitioned."""
    if n <= 0:
        return []
    if n * width >= values.size:
        return np.argpartition(-values, min(n, values.size) - 1)[:n].tolist()
    rows = -(-values.size // width)
    grid = np.full(rows * width, -np.inf, dtype=values.dtype)
    grid[: values.size] = values
    grid = grid.reshape(rows, width)
    chosen = np.argpartition(-grid.max(axis=1), n - 1)[:n]
    flat = (chosen[:, None] * width + np.arange(width)).ravel()
    candidates = grid[chosen].ravel()
    return flat[np.argpartition(-candidates, n - 1)[:n]].tolist()


def alt(text_bytes: bytes, logprob: float) -> Entry:
    return {Key.TOKEN: text_bytes.decode("utf-8", "replace"), Key.BYTES: list(text_bytes), Key.LOGPROB: logprob}


def merged(entries: list[Entry]) -> Entry:
    """Several model tokens that a backend counts as one (a character split over them): their
    joint log-probability, their bytes, and the alternatives at the first of them."""
    if len(entries) == 1:
        return entries[0]
    if not entries:
        return entry(b"", 0.0, [])
    data = b"".join(bytes(e[Key.BYTES]) for e in entries)
    return entry(data, sum(e[Key.LOGPROB] for e in entries), entries[0][Key.TOP_LOGPROBS])


def token_pieces(llama_cpp: Any, vocab: Any) -> Callable[[int], bytes]:
    """A token's bytes as llama.cpp writes it out (special tokens as nothing), with a buffer of
    its own that grows as needed."""
    buf = ctypes.create_string_buffer(64)

    def piece(token: int) -> bytes:
        nonlocal buf
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
        if n < 0:  # longer than the buffer: it says how long
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    return piece
