"""`stoker embed`: embed a JSONL corpus through the supervisor, resumably, as `stoker batch` runs
prompts: the same output file rules (whole lines, one writer, skip the ids already done), the
same progress display. Items go `batch_size` to an embed request (the worker evaluates them
together); an item the model refuses (too long, say) fails alone, its batch-mates do not.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Callable, Iterable

from stoker.protocol.async_client import AsyncClient
from stoker.protocol.errors import BadRequest, Overloaded, ShuttingDown, StokerError, Unreachable
from stoker.protocol.messages import Key
from stoker.supervisor.batch import _OVERLOADED_RETRY_S, Fatal, Item, Output, Progress, parse_jsonl, run_lanes


def parse_texts(lines: Iterable[str]) -> tuple[list[Item], list[str]]:
    """Texts: each item has "text", a non-empty string (other keys are kept but not used)."""
    return parse_jsonl(lines, lambda obj: None if isinstance(obj.get("text"), str) and obj["text"]
                       else 'needs "text", a non-empty string')


async def run_texts(items: list[Item], client: AsyncClient, output: Output, batch_size: int, concurrency: int,
                    keys: dict[str, Any], progress: Progress, on_change: Callable[[], None]) -> None:
    """Embed the items, `batch_size` per request and `concurrency` requests at once, writing each
    item's line as its request ends."""
    groups = (items[i:i + batch_size] for i in range(0, len(items), batch_size))
    await run_lanes(groups, lambda group: embed_group(group, client, keys, progress), output, concurrency, progress,
                    on_change)


async def embed_group(group: list[Item], client: AsyncClient, keys: dict[str, Any],
                      progress: Progress) -> list[dict[str, Any]]:
    """One embed request for the group's texts: a line per item. A text the model refuses fails
    alone (the group is sent again one by one); a supervisor gone raises Fatal."""
    delay = _OVERLOADED_RETRY_S[0]
    while True:
        try:
            done = await client.embed([i.request["text"] for i in group], **keys)
            progress.tokens += int(done.usage.get(Key.PROMPT_TOKENS, 0))
            return [{"id": i.id, "embedding": v} for i, v in zip(group, done.embeddings)]
        except Overloaded:
            await asyncio.sleep(delay)
            delay = min(delay * 2, _OVERLOADED_RETRY_S[1])
        except (Unreachable, ShuttingDown) as exc:
            raise Fatal(exc) from None
        except BadRequest as exc:
            if len(group) > 1:  # one of them is at fault: each on its own, so the rest succeed
                return [line for item in group for line in await embed_group([item], client, keys, progress)]
            return [{"id": group[0].id, "error": {"code": exc.code.value, "message": exc.message}}]
        except StokerError as exc:
            return [{"id": i.id, "error": {"code": exc.code.value, "message": exc.message}} for i in group]


def npy_paths(output: Path) -> tuple[Path, Path]:
    """Where --format npy puts the matrix and its ids, beside OUTPUT (out.jsonl: out.npy, out.ids.json)."""
    return output.with_suffix(".npy"), output.with_suffix(".ids.json")


def write_npy(output: Path, items: list[Item]) -> tuple[Path, int]:
    """The vectors OUTPUT holds, as one float32 matrix in input order (a row per item that
    succeeded) and the ids of its rows. Returns the matrix's path and its rows."""
    import numpy as np

    vectors: dict[Any, list[float]] = {}
    with open(output, encoding="utf-8") as f:
        for raw in f:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict) and "embedding" in obj:
                vectors[obj["id"]] = obj["embedding"]
            elif isinstance(obj, dict):
                vectors.pop(obj.get("id"), None)  # the last line of an id wins
    ids = [i.id for i in items if i.id in vectors]
    matrix, id_path = npy_paths(output)
    rows = np.asarray([vectors[i] for i in ids], dtype=np.float32)
    np.save(matrix, rows.reshape(len(ids), -1) if ids else np.zeros((0, 0), dtype=np.float32))
    id_path.write_text(json.dumps(ids, ensure_ascii=False) + "\n", encoding="utf-8")
    return matrix, len(ids)
