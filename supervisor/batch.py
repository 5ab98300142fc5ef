"""`stoker batch`: run a JSONL file of prompts through the supervisor, resumably.

Each output line is written whole with one append (O_APPEND) the moment its item ends, so a
job killed at any point leaves complete lines only, apart from a line torn by a power cut, which
the next run cuts off. A write that fails (a full disk) is cut off at once, and the job stops.
Run again and the ids already in OUTPUT are skipped.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import IO, Any, Awaitable, Callable, Iterable, Iterator, Mapping

from stoker.protocol.messages import Key
from stoker.protocol.async_client import AsyncClient
from stoker.protocol.errors import Overloaded, ShuttingDown, StokerError, Unreachable

ItemId = str | int
_OVERLOADED_RETRY_S = (0.2, 5.0)  # backoff when the model's queue is full: first, most


@dataclass(frozen=True)
class Item:
    line: int
    id: ItemId
    request: dict[str, Any]  # prompt or messages, model, sampling keys


def parse_jsonl(lines: Iterable[str], check: Callable[[dict[str, Any]], str | None]) -> tuple[list[Item], list[str]]:
    """The valid items of a JSONL input, and a sentence for each line that is not one (numbered
    from 1): each an object with an "id" (a string or an integer) used once, and whatever `check`
    asks of the rest (it returns what is wrong, or None)."""
    items: list[Item] = []
    problems: list[str] = []
    first_line: dict[ItemId, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            problems.append(f"line {number}: not valid JSON ({exc.msg}); skipped")
            continue
        if not isinstance(obj, dict):
            problems.append(f"line {number}: must be a JSON object, not {type(obj).__name__}; skipped")
            continue
        item_id = obj.pop("id", None)
        if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
            problems.append(f'line {number}: needs an "id" (a string or an integer); skipped')
            continue
        wrong = check(obj)
        if wrong:
            problems.append(f"line {number}: {wrong}; skipped")
            continue
        if item_id in first_line:
            problems.append(f"line {number}: id {item_id!r} is already on line {first_line[item_id]}; skipped")
            continue
        first_line[item_id] = number
        items.append(Item(number, item_id, obj))
    return items, problems


def parse_items(lines: Iterable[str]) -> tuple[list[Item], list[str]]:
    """Prompts: each item has exactly one of "prompt" or "messages"."""
    return parse_jsonl(lines, lambda obj: None if ("prompt" in obj) != ("messages" in obj)
                       else 'needs exactly one of "prompt" or "messages"')


def read_output(path: str) -> tuple[dict[ItemId, bool], list[str]]:
    """What OUTPUT already holds: id -> succeeded (the last line of an id wins). A last line
    without its newline (cut by a crash of the machine) is removed from the file."""
    if not os.path.exists(path):
        return {}, []
    notes: list[str] = []
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
            notes.append(f"{path}: removed an incomplete last line ({len(data) - end} bytes)")
            data = data[:end]
    results: dict[ItemId, bool] = {}
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            obj = json.loads(raw)
            results[obj["id"]] = "error" not in obj
        except (ValueError, KeyError, TypeError):
            notes.append(f"{path}: line {number} is not a result line; ignored")
    return results, notes


class OutputBusy(Exception):
    """Another `stoker batch` is writing the same OUTPUT."""


class OutputFailed(Exception):
    """OUTPUT cannot be written (a full disk, a file-size limit, an I/O error). The line that
    failed was cut off again: the file ends with whole lines."""


class Output:
    """OUTPUT, appended one whole line per write, by one batch at a time (an flock)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise OutputBusy(f"{path} is being written by another stoker batch") from None
        self.size = os.fstat(self.fd).st_size  # where the next line starts (we are its only writer)

    def write(self, record: dict[str, Any]) -> None:
        """Append one line, whole or not at all: one write (a killed process never leaves half
        a line), and a write that fails or falls short is cut off again."""
        try:
            line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        except UnicodeEncodeError:  # a lone surrogate (valid JSON input, not UTF-8): escape it
            line = (json.dumps(record) + "\n").encode()
        try:
            written = os.write(self.fd, line)
            problem = "" if written == len(line) else f"only {written} of {len(line)} bytes of a line were written"
        except OSError as exc:
            problem = exc.strerror or str(exc)
        if problem:
            try:
                os.ftruncate(self.fd, self.size)
            except OSError as exc:
                problem += f", and its start could not be cut off ({exc.strerror}): run again to repair it"
            raise OutputFailed(f"cannot write {self.path}: {problem}")
        self.size += len(line)

    def close(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise OutputFailed(f"cannot write {self.path}: {exc.strerror or exc}") from None
        finally:
            os.close(self.fd)


@dataclass
class Progress:
    """What the progress display and the summary show."""

    total: int
    skipped: int = 0
    done: int = 0
    failed: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    def count(self, record: Mapping[str, Any]) -> None:
        """An item's output line was written."""
        if "error" in record:
            self.failed += 1
        else:
            self.done += 1

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(1e-9, time.monotonic() - self.started)


class Fatal(Exception):
    """The supervisor went away or stopped answering: stop, and let a later run continue."""

    def __init__(self, error: StokerError) -> None:
        super().__init__(error.message)
        self.error = error


def with_id_seeds(items: list[Item]) -> list[Item]:
    """Items that set no seed get one from their id: run again (a resumed job, or a Ray task
    re-run after its node died), an item gives the same text."""
    return [i if Key.SEED in i.request else
            Item(i.line, i.id, {**i.request, Key.SEED: zlib.crc32(json.dumps(i.id).encode())}) for i in items]


def item_request(item: Item, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The request for an item: its own keys, and `defaults` (the command's model, sampling
    flags, schema) for those it does not set. An item's own constraint wins whole: one with a
    `grammar` gets no default `response_format`."""
    request = {**defaults, **item.request}
    if Key.GRAMMAR in item.request and Key.RESPONSE_FORMAT not in item.request:
        request.pop(Key.RESPONSE_FORMAT, None)
    return request


def check_json(text: str, fmt: Mapping[str, Any]) -> tuple[Any, str | None]:
    """A constrained item's text parsed, and None; or None and why it does not parse or fit
    its schema (a text cut short by max_tokens is incomplete JSON)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        return None, f"the text is not JSON ({exc.msg} at character {exc.pos})"
    if fmt.get(Key.TYPE) == "json_schema":
        import jsonschema

        try:
            jsonschema.validate(value, fmt[Key.SCHEMA])
        except jsonschema.ValidationError as exc:
            return None, f"the JSON does not fit the schema: {exc.message}"
        except jsonschema.SchemaError as exc:
            return None, f"the schema is not a valid JSON schema: {exc.message}"
    return value, None


def result_record(item: Item, request: Mapping[str, Any], text: str, reason: str, usage: dict[str, Any],
                  timings: dict[str, Any], logprobs: list[Any] | None = None) -> dict[str, Any]:
    """An item's output line. With `response_format`, it carries the parsed value (`json`), or,
    when the text does not parse or fit the schema, an `invalid_output` error beside the text:
    a failure, so that --retry-failed runs it again (with a higher --max-tokens, say). An item
    that asked for `logprobs` gets its tokens' entries."""
    record: dict[str, Any] = {"id": item.id, "text": text}
    if logprobs is not None:
        record["logprobs"] = logprobs
    fmt = request.get(Key.RESPONSE_FORMAT)
    if fmt is not None:
        value, why = check_json(text, fmt)
        if why is None:
            record["json"] = value
        else:
            cut = " (the text was cut short by max_tokens)" if reason == "length" else ""
            record["error"] = {"code": "invalid_output", "message": why + cut}
    return {**record, "usage": usage, "timings": timings}


async def run_item(item: Item, client: AsyncClient, defaults: Mapping[str, Any], progress: Progress) -> dict[str, Any]:
    """One item's output line (its result or its error). Overloaded is waited out; a supervisor
    gone or shutting down raises Fatal (the item is not at fault: a later run does it)."""
    request = item_request(item, defaults)
    delay = _OVERLOADED_RETRY_S[0]
    while True:
        try:
            done = await client.complete(**request)
            progress.tokens += int(done.usage.get(Key.COMPLETION_TOKENS, 0))
            return result_record(item, request, done.text, done.reason, dict(done.usage), dict(done.timings),
                                 done.logprobs)
        except Overloaded:  # the queue is full for now: wait for room, it is not this item's fault
            await asyncio.sleep(delay)
            delay = min(delay * 2, _OVERLOADED_RETRY_S[1])
        except (Unreachable, ShuttingDown) as exc:
            raise Fatal(exc) from None
        except StokerError as exc:
            return {"id": item.id, "error": {"code": exc.code.value, "message": exc.message}}
        except TypeError as exc:  # a key the client cannot take as an argument
            return {"id": item.id, "error": {"code": "bad_request", "message": str(exc)}}


async def run_items(items: list[Item], client: AsyncClient, output: Output, concurrency: int,
                    defaults: Mapping[str, Any], progress: Progress, on_change: Callable[[], None]) -> None:
    """Run the items, `concurrency` at a time on one socket, writing each result as it ends.
    `defaults`: keys for the items that do not set them (see item_request)."""
    async def one(group: list[Item]) -> list[dict[str, Any]]:
        return [await run_item(group[0], client, defaults, progress)]

    await run_lanes(([item] for item in items), one, output, concurrency, progress, on_change)


async def run_lanes(groups: Iterable[list[Item]], work: Callable[[list[Item]], Awaitable[list[dict[str, Any]]]],
                    output: Output, concurrency: int, progress: Progress, on_change: Callable[[], None]) -> None:
    """`concurrency` lanes, each taking the next group, running it (`work` gives its output lines)
    and writing its lines as it ends."""
    queue: Iterator[list[Item]] = iter(groups)

    async def lane() -> None:
        for group in queue:
            for record in await work(group):
                output.write(record)  # OutputFailed stops every lane: what is in flight runs again next time
                progress.count(record)
            on_change()

    lanes = [asyncio.create_task(lane()) for _ in range(max(1, concurrency))]
    try:
        await asyncio.gather(*lanes)
    finally:
        for lane_task in lanes:
            lane_task.cancel()
        await asyncio.gather(*lanes, return_exceptions=True)


def open_input(path: str, stdin: IO[str]) -> IO[str]:
    return stdin if path == "-" else open(path, encoding="utf-8")
