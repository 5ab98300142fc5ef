"""The gateway's HTTP application (Starlette): the OpenAI and Ollama APIs, the status page, health
and metrics, over one AsyncClient connection to the supervisor.

Starlette, not FastAPI: the two APIs' request bodies are checked by the mapping modules with the
errors each API defines, so FastAPI's pydantic validation (and its dependency) would only be in
the way; uvicorn serves it. Everything here is async on one event loop: an HTTP request waits on
its stoker request's replies, never on a lock or a blocking call.

Each HTTP caller is one "user" to the supervisor's fair queue: the name of its API key, else the
request's own `user` field, else the connection's address, so callers sharing this one
connection still take turns. A caller that disconnects cancels what it asked for.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from stoker.gateway import ollama_api as ol
from stoker.gateway import openai_api as oa
from stoker.gateway.auth import Keys
from stoker.gateway.openai_api import ApiError
from stoker.protocol.async_client import AsyncClient
from stoker.protocol.errors import (
    BadRequest, Cancelled, InsufficientMemory, Internal, LoadFailed, Overloaded, ShuttingDown, StokerError, Timeout,
    UnknownModel, Unreachable, WorkerCrashed,
)
from stoker.protocol.messages import Key
from stoker.protocol.replies import End, Info, Token
from stoker.supervisor import __version__

STATIC = Path(__file__).parent / "static"
try:  # the metrics extra: /metrics counts what this gateway served
    from prometheus_client import Counter

    _REQUESTS: Any = Counter("stoker_gateway_requests", "Requests the gateway served", ["api", "model", "outcome"])
except ImportError:
    _REQUESTS = None
RETRY_AFTER_S = 1
MAX_EMBED_INPUTS = 2048  # texts in one embeddings request (the OpenAI API's limit)
_RECENT = 50


def http_status(exc: StokerError) -> int:
    """The HTTP status for a stoker error."""
    if isinstance(exc, UnknownModel):
        return 404
    if isinstance(exc, BadRequest):
        return 400
    if isinstance(exc, Overloaded):
        return 429
    if isinstance(exc, (InsufficientMemory, LoadFailed, ShuttingDown, Unreachable)):
        return 503
    if isinstance(exc, WorkerCrashed):
        return 502
    if isinstance(exc, Timeout):
        return 504
    return 500


_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                 429: "rate_limit_exceeded"}


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


def ollama_error(status: int, message: str) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@dataclass
class Recent:
    """A request this gateway served, for the status page."""

    when: float
    api: str
    model: str
    outcome: str
    tokens: int
    ttft_ms: float
    total_ms: float


@dataclass
class Gateway:
    """What the routes share: the supervisor connection, the API keys, what it served lately."""

    endpoint: str | None
    keys: Keys
    timeout: float = 30.0
    client: AsyncClient | None = None
    recent: deque[Recent] = field(default_factory=lambda: deque(maxlen=_RECENT))
    served: int = 0
    started: float = field(default_factory=time.time)
    listen_host: str = "127.0.0.1"  # the address it listens on (a Host header may name it)

    def supervisor(self) -> AsyncClient:
        if self.client is None or self.client.closed:
            self.client = AsyncClient(self.endpoint, timeout=self.timeout)
        return self.client

    def note(self, api: str, model: str, outcome: str, tokens: int = 0, timings: dict | None = None,
             refused: bool = False) -> None:
        """A request that ended, or (`refused`) one refused or left before it ran: the model a
        caller named then is only shown, not made a metrics label (labels must stay few)."""
        t = timings or {}
        if not refused:
            self.served += 1
        if _REQUESTS is not None:
            _REQUESTS.labels(api, "" if refused else model, outcome).inc()
        self.recent.appendleft(Recent(time.time(), api, model[:100], outcome, tokens, t.get(Key.TTFT_MS, 0.0),
                                      t.get(Key.TOTAL_MS, 0.0)))


# ---- helpers ------------------------------------------------------------------------------------


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ClientDisconnect:
        raise Cancelled("the caller disconnected") from None
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    request.state.body = body  # for the note of a request refused later
    return body


async def _until_disconnect(request: Request) -> None:
    """Returns once the caller has gone (its connection closed)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _or_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """`work`, unless the caller goes first: then it is cancelled (and with it its stoker requests,
    whose streams cancel them when left) and Cancelled is raised."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise Cancelled("the caller disconnected")


async def _all(*work: Awaitable[Any]) -> list[Any]:
    """Every result, or the first failure with the rest cancelled (and so their stoker requests,
    which leaving a stream or an embed cancels): a caller refused for one choice leaves nothing
    running for the others."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


class _Completion:
    """One stoker generate's outcome, gathered from its stream."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.logprobs: list[dict] | None = None
        self.end: End | None = None
        self.model = ""  # the model that ran it (the default one, when the caller named none)


async def _complete(client: AsyncClient, keys: dict[str, Any]) -> _Completion:
    out = _Completion()
    stream = client.generate(**keys)
    async for ev in stream.events():
        if isinstance(ev, Token):
            out.text.append(ev.text)
            if ev.logprobs is not None:
                out.logprobs = out.logprobs or []
                out.logprobs.extend(ev.logprobs)
        elif isinstance(ev, Info) and ev.model:
            out.model = ev.model
        elif isinstance(ev, End):
            out.end = ev
    if out.end is None or out.end.reason == "cancelled":
        # The caller is still here (a caller that left is seen by _or_disconnect): the supervisor
        # ended it (shutting down, or dropping this gateway's connection).
        raise ShuttingDown("the supervisor ended the request before it finished")
    return out


async def _started(client: AsyncClient, jobs: list[dict[str, Any]]) -> list[tuple[Any, Any, Any]]:
    """Start each job's stream and read its first reply, which the supervisor sends at once: an
    info, or the error that refuses it (an unknown model, a full queue). So a refusal is the
    HTTP response's status, not an error inside a stream already begun with 200. Each job: its
    stream, its events (an async iterator), and its first event."""
    streams = [client.generate(**job) for job in jobs]
    events = [s.events().__aiter__() for s in streams]
    try:
        firsts = await _all(*(e.__anext__() for e in events))
    except BaseException:
        for s in streams:
            s.cancel()
        raise
    return list(zip(streams, events, firsts))


def _user(gw: Gateway, request: Request, body: dict[str, Any]) -> str:
    """Whom the fair queue counts this caller as: its key's name, else the body's `user`, else its address."""
    key_name = request.state.key_name
    if key_name:
        return _fair_name("key", key_name)
    if isinstance(body.get("user"), str) and body["user"]:
        return _fair_name("user", body["user"])
    host = request.client.host if request.client else "?"
    return _fair_name("addr", host)


_LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}


def _foreign(gw: Gateway, request: Request) -> str:
    """Why a browser's request from another site is refused ("" if it is not one). A web page the
    user opens may send requests to a gateway on loopback (no keys there, by default): one from
    another origin is refused, and so, without keys, is one whose Host is not this gateway's (DNS
    rebinding: a page whose own name resolves to 127.0.0.1)."""
    host = request.headers.get("host", "")
    origin = request.headers.get("origin")
    if origin is not None and origin.split("://", 1)[-1].rstrip("/") != host:
        return (f"requests from another web site ({origin}) are refused; call the gateway from a program, or "
                "open its status page from the gateway itself")
    if not gw.keys.required:
        name = host[: host.index("]") + 1] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        name = name.lower().rstrip(".")  # host names are case-blind; "localhost." is localhost
        if name and name not in _LOOPBACK_NAMES and name != gw.listen_host.lower():
            return f"this gateway answers to its own address only, not to Host {host!r}"
    return ""


def _fair_name(kind: str, name: str) -> str:
    """A `user` the protocol takes (at most 256 bytes): a long name is replaced by its hash."""
    text = f"{kind}:{name}"
    if len(text.encode("utf-8", "surrogatepass")) <= 200:
        return text
    import hashlib

    return f"{kind}#" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()


def _route(api: str, handler: Callable[[Gateway, Request], Awaitable[Response]], gw: Gateway,
           public: bool = False, asks: bool = True) -> Callable[[Request], Awaitable[Response]]:
    """A handler with the key check and each API's error shape around it: never a stack trace.
    `asks`: it asks the supervisor, so a supervisor that is plainly gone (an ipc endpoint with no
    socket file) is a 503 at once, not after the client's timeout."""
    error = openai_error if api == "openai" else ollama_error

    def fail(status: int, message: str, param: str | None = None, code: str | None = None) -> Response:
        return openai_error(status, message, param, code) if api == "openai" else ollama_error(status, message)

    async def endpoint(request: Request) -> Response:
        refused = _foreign(gw, request)
        if refused:
            return fail(403, refused, None, "forbidden")
        name = "" if public else gw.keys.caller(request.headers.get("authorization"))
        if name is None:
            return fail(401, "a valid API key is needed: send 'Authorization: Bearer KEY'", None, "invalid_api_key")
        request.state.key_name = name
        try:
            if asks:
                gw.supervisor().check_endpoint()
            return await handler(gw, request)
        except ApiError as exc:
            _note_refused(gw, api, request, "bad_request" if exc.status == 400 else str(exc.status))
            return fail(exc.status, exc.message, exc.param, exc.code)
        except Cancelled:
            _note_refused(gw, api, request, "cancelled")
            return Response(status_code=499)  # nobody reads it: the caller has gone
        except StokerError as exc:
            status = http_status(exc)
            code = exc.code.value if exc.code else None
            if isinstance(exc, UnknownModel):
                code = "model_not_found"
            elif isinstance(exc, Unreachable):
                code = "supervisor_unavailable"
            _note_refused(gw, api, request, code or str(status))
            return fail(status, exc.message, "model" if status == 404 else None, code)
        except Exception as exc:  # a bug: the caller gets a sentence, the log gets the trace
            import traceback

            traceback.print_exc()
            return error(500, f"internal error in the gateway: {type(exc).__name__}")

    return endpoint


def _note_refused(gw: Gateway, api: str, request: Request, outcome: str) -> None:
    """A generation or embedding that was refused or left: on the page and in the metrics too."""
    body = getattr(request.state, "body", None)
    if body is not None and request.method == "POST":
        model = body.get("model")
        gw.note(api, model if isinstance(model, str) else "", outcome, refused=True)


async def _not_found(request: Request, exc: Exception) -> Response:
    """Unknown paths and methods, in the shape of the API the path belongs to."""
    status = getattr(exc, "status_code", 404)
    message = (f"no such endpoint: {request.method} {request.url.path}" if status == 404
               else f"{request.method} is not allowed on {request.url.path}")
    if request.url.path.startswith("/v1/"):
        return openai_error(status, message, None, "not_found" if status == 404 else "method_not_allowed")
    return ollama_error(status, message)


# ---- OpenAI -------------------------------------------------------------------------------------


async def openai_models(gw: Gateway, request: Request) -> Response:
    data = await gw.supervisor().models()
    models = [{"id": m["name"], "object": "model", "created": 0, "owned_by": "stoker"} for m in data["models"]]
    model_id = request.path_params.get("model")
    if model_id is not None:
        match = [m for m in models if m["id"] == model_id]
        if not match:
            raise UnknownModel(f"no model named {model_id!r}")
        return JSONResponse(match[0])
    return JSONResponse({"object": "list", "data": models})


async def _openai_generate(gw: Gateway, request: Request, chat: bool) -> Response:
    body = await _body(request)
    if chat:
        keys, n = oa.chat_request(body)
        jobs = oa.seeds(keys, n)
    else:
        prompts = oa.completion_prompts(body)
        keys, n = oa.sampling(body, chat=False)
        jobs = [{**job, Key.PROMPT: p} for p in prompts for job in oa.seeds(keys, n)]
    model = body.get("model")
    for job in jobs:
        job[Key.MODEL] = model if isinstance(model, str) and model else None
        job[Key.USER] = _user(gw, request, body)
    client = gw.supervisor()
    rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    created = oa.now()
    options = body.get("stream_options")
    if body.get("stream"):
        include_usage = bool((options or {}).get("include_usage"))
        started = await _or_disconnect(request, _started(client, jobs))
        return StreamingResponse(_openai_stream(gw, started, n, rid, created, chat, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    done = await _or_disconnect(request, _all(*(_complete(client, job) for job in jobs)))
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for i, c in enumerate(done):
        usage = c.end.usage
        if i % n == 0:  # the n choices of one prompt read it once
            prompt_tokens += usage.get(Key.PROMPT_TOKENS, 0)
        completion_tokens += usage.get(Key.COMPLETION_TOKENS, 0)
        text = "".join(c.text)
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                            "finish_reason": oa.finish_reason(c.end.reason), "logprobs": oa.chat_logprobs(c.logprobs)})
        else:
            choices.append({"index": i, "text": text, "finish_reason": oa.finish_reason(c.end.reason),
                            "logprobs": oa.completion_logprobs(c.logprobs)})
        gw.note("openai", c.model, c.end.reason, usage.get(Key.COMPLETION_TOKENS, 0), dict(c.end.timings))
    return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                         "model": done[0].model, "choices": choices, "system_fingerprint": None,
                         "usage": oa.usage(prompt_tokens, completion_tokens)})


async def _openai_stream(gw: Gateway, started: list[tuple[Any, Any, Any]], n: int, rid: str,
                         created: int, chat: bool, include_usage: bool) -> AsyncIterator[bytes]:
    """SSE chunks of every choice as their tokens come (choices interleave, each with its index),
    a last chunk per choice with its finish_reason, the usage if asked, then [DONE]. Leaving
    early (the caller went) cancels every choice's request."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    model: dict[str, str] = {}  # the model that runs it, once an info names it
    unended = "cancelled"  # what the choices that never end count as: the caller left, unless an error came
    tasks: list[asyncio.Future[None]] = []
    ended, usage = 0, [0, 0]
    name = next((f.model for _, _, f in started if isinstance(f, Info) and f.model), "")
    jobs = started
    plain: dict[tuple[int, str], tuple[bytes, bytes]] = {}  # a text-only chunk's bytes around its text
    offsets: dict[int, int] = {}  # each choice's text so far, in characters (legacy logprobs' text_offset)

    def chunk(index: int, delta: dict[str, Any] | None, text: str | None, finish: str | None,
              logprobs: Any = None) -> bytes:
        choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": logprobs}
        if chat:
            choice["delta"] = delta or {}
        else:
            choice["text"] = text or ""
        return _sse({"id": rid, "object": kind, "created": created, "model": model.get("name", name),
                     "choices": [choice], **({"usage": None} if include_usage else {})})

    def token_chunk(index: int, text: str) -> bytes:
        """chunk() for a token without logprobs, the common case, by filling in the text alone:
        the rest of the chunk is the same for every token of a choice."""
        key = (index, model.get("name", name))
        around = plain.get(key)
        if around is None:
            marker = "\u0000stoker\u0000"
            whole = chunk(index, {"content": marker}, marker, None)
            head, _, tail = whole.partition(json.dumps(marker).encode())
            around = plain[key] = (head, tail)
        return around[0] + json.dumps(text, ensure_ascii=False).encode() + around[1]

    async def events() -> AsyncIterator[tuple[int, Any]]:
        """(choice, event) as they come: one choice straight from its stream; several through a
        queue their streams feed."""
        if len(started) == 1:
            _, stream_events, first = started[0]
            try:
                yield 0, first
                async for ev in stream_events:
                    yield 0, ev
            except StokerError as exc:
                yield 0, exc
            except Exception as exc:  # (the client's reader died): an error event, not a hung stream
                yield 0, Internal(f"the gateway lost the supervisor's replies: {type(exc).__name__}")
            return
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(index: int, stream_events: Any, first: Any) -> None:
            try:
                await queue.put((index, first))
                async for ev in stream_events:
                    await queue.put((index, ev))
            except StokerError as exc:
                await queue.put((index, exc))
            except Exception as exc:  # (the client's reader died): an error event, not a hung stream
                await queue.put((index, Internal(f"the gateway lost the supervisor's replies: {type(exc).__name__}")))

        tasks.extend(asyncio.ensure_future(pump(i, e, f)) for i, (_, e, f) in enumerate(started))
        while True:
            yield await queue.get()

    try:
        if chat:
            for i in range(len(jobs)):
                yield chunk(i, {"role": "assistant", "content": ""}, None, None)
        async for index, ev in events():
            if isinstance(ev, StokerError):
                status = http_status(ev)
                unended = ev.code.value if ev.code else "error"
                yield _sse({"error": {"message": ev.message, "type": _OPENAI_TYPES.get(status, "server_error"),
                                      "code": ev.code.value if ev.code else None}})
                return
            if isinstance(ev, Token):
                if ev.logprobs is None:
                    yield token_chunk(index, ev.text)
                elif chat:
                    yield chunk(index, {"content": ev.text}, None, None, oa.chat_logprobs(ev.logprobs))
                else:
                    yield chunk(index, None, ev.text, None, oa.completion_logprobs(ev.logprobs, offsets.get(index, 0)))
                offsets[index] = offsets.get(index, 0) + len(ev.text)
            elif isinstance(ev, End) and ev.reason == "cancelled":
                unended = "shutting_down"
                yield _sse({"error": {"message": "the supervisor ended the request before it finished",
                                      "type": "server_error", "code": "shutting_down"}})
                return
            elif isinstance(ev, End):
                ended += 1
                if index % n == 0:  # the n choices of one prompt read it once
                    usage[0] += ev.usage.get(Key.PROMPT_TOKENS, 0)
                usage[1] += ev.usage.get(Key.COMPLETION_TOKENS, 0)
                gw.note("openai", model.get("name", name), ev.reason, ev.usage.get(Key.COMPLETION_TOKENS, 0),
                        dict(ev.timings))
                yield chunk(index, {}, "", oa.finish_reason(ev.reason))
                if ended == len(jobs):
                    break
            elif isinstance(ev, Info) and ev.model:
                model["name"] = ev.model
        if include_usage:
            yield _sse({"id": rid, "object": kind, "created": created, "model": model.get("name", name), "choices": [],
                        "usage": oa.usage(usage[0], usage[1])})
        yield b"data: [DONE]\n\n"
    finally:
        for _ in range(len(jobs) - ended):
            gw.note("openai", model.get("name", name), unended)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream, _, _ in started:
            stream.cancel()  # one that has not ended (the caller left): its request is cancelled


async def openai_chat(gw: Gateway, request: Request) -> Response:
    return await _openai_generate(gw, request, chat=True)


async def openai_completions(gw: Gateway, request: Request) -> Response:
    return await _openai_generate(gw, request, chat=False)


async def openai_embeddings(gw: Gateway, request: Request) -> Response:
    body = await _body(request)
    texts, _, encoding = oa.embedding_request(body)
    if len(texts) > MAX_EMBED_INPUTS:
        raise ApiError(400, f"'input' may hold at most {MAX_EMBED_INPUTS} texts", "input")
    model = body.get("model") if isinstance(body.get("model"), str) and body.get("model") else None
    client = gw.supervisor()
    batches = [texts[i:i + 256] for i in range(0, len(texts), 256)]
    results = await _or_disconnect(request, _all(
        *(client.embed(b, model=model, user=_user(gw, request, body)) for b in batches)))
    vectors = [v for r in results for v in r.embeddings]
    tokens = sum(r.usage.get(Key.PROMPT_TOKENS, 0) for r in results)
    gw.note("openai", results[0].model, "embed", 0, dict(results[0].timings))
    data = [{"object": "embedding", "index": i, "embedding": oa.encode_vector(v, encoding)}
            for i, v in enumerate(vectors)]
    return JSONResponse({"object": "list", "data": data, "model": results[0].model,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


# ---- Ollama -------------------------------------------------------------------------------------


async def _ollama_generate(gw: Gateway, request: Request, chat: bool) -> Response:
    body = await _body(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required")
    client = gw.supervisor()
    alive = ol.keep_alive(body.get("keep_alive"))
    if not chat and not body.get("prompt") or chat and body.get("messages") == []:
        # Ollama's way to load (or, with keep_alive 0, unload) a model.
        if alive == 0:
            await client.unload(model)
            out = {"model": model, "created_at": ol.timestamp(), "done": True, "done_reason": "unload"}
            out.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
            return JSONResponse(out)
        # "For good" is a long keep_alive, not a pin: a later keep_alive replaces it, and memory
        # pressure may still evict it (as in Ollama).
        await client.load(model, keep_alive=alive)
        out = {"model": model, "created_at": ol.timestamp(), "done": True, "done_reason": "load"}
        out.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
        return JSONResponse(out)
    keys = ol.chat_request(body) if chat else ol.generate_request(body)
    keys.update({Key.MODEL: model, Key.USER: _user(gw, request, body)})
    if alive is not None:  # else the model's idle_timeout, as for any client
        keys[Key.KEEP_ALIVE] = alive

    def piece(text: str) -> dict[str, Any]:
        out: dict[str, Any] = {"model": model, "created_at": ol.timestamp()}
        out.update({"message": {"role": "assistant", "content": text}} if chat else {"response": text})
        return out

    if ol.stream(body):
        [(stream, events, first)] = await _or_disconnect(request, _started(client, [keys]))

        async def lines() -> AsyncIterator[bytes]:
            async def all_events() -> AsyncIterator[Any]:
                yield first
                async for ev in events:
                    yield ev

            outcome = "cancelled"  # unless it ends, or an error comes: the caller left
            try:
                async for ev in all_events():
                    if isinstance(ev, Token):
                        yield json.dumps({**piece(ev.text), "done": False}, ensure_ascii=False).encode() + b"\n"
                    elif isinstance(ev, End):
                        outcome = ""
                        gw.note("ollama", model, ev.reason, ev.usage.get(Key.COMPLETION_TOKENS, 0), dict(ev.timings))
                        final = {**piece(""), **ol.final_fields(ev.reason, ev.usage, ev.timings)}
                        yield json.dumps(final).encode() + b"\n"
            except StokerError as exc:
                outcome = exc.code.value if exc.code else "error"
                yield json.dumps({"error": exc.message}).encode() + b"\n"
            finally:
                if outcome:
                    gw.note("ollama", model, outcome)
                stream.cancel()  # not ended (the caller left): its request is cancelled

        return StreamingResponse(lines(), media_type="application/x-ndjson")
    done = await _or_disconnect(request, _complete(client, keys))
    end = done.end
    gw.note("ollama", model, end.reason, end.usage.get(Key.COMPLETION_TOKENS, 0), dict(end.timings))
    return JSONResponse({**piece("".join(done.text)), **ol.final_fields(end.reason, end.usage, end.timings)})


async def ollama_chat(gw: Gateway, request: Request) -> Response:
    return await _ollama_generate(gw, request, chat=True)


async def ollama_generate(gw: Gateway, request: Request) -> Response:
    return await _ollama_generate(gw, request, chat=False)


async def ollama_embed(gw: Gateway, request: Request) -> Response:
    body = await _body(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required")
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise ApiError(400, "input must be a non-empty string or a list of them")
    if len(texts) > MAX_EMBED_INPUTS:
        raise ApiError(400, f"input may hold at most {MAX_EMBED_INPUTS} texts")
    truncate = body.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ApiError(400, "truncate must be true or false")
    if body.get("dimensions") is not None:
        raise ApiError(400, "stoker does not support 'dimensions' (its vectors have the model's size)")
    alive = ol.keep_alive(body.get("keep_alive"))
    client = gw.supervisor()
    results = await _or_disconnect(request, _all(*(
        client.embed(texts[i:i + 256], model=model, truncate=truncate, user=_user(gw, request, body),
                     keep_alive=alive)
        for i in range(0, len(texts), 256))))
    t = results[0].timings
    gw.note("ollama", model, "embed", 0, dict(t))
    return JSONResponse({"model": model, "embeddings": [v for r in results for v in r.embeddings],
                         "total_duration": int(t.get(Key.TOTAL_MS, 0) * 1e6),
                         "load_duration": int(t.get(Key.LOAD_MS, 0) * 1e6),
                         "prompt_eval_count": sum(r.usage.get(Key.PROMPT_TOKENS, 0) for r in results)})


def _details(m: dict[str, Any]) -> dict[str, Any]:
    return {"format": "gguf" if m.get("backend") == "llama" else m.get("backend", ""), "family": "",
            "families": None, "parameter_size": "", "quantization_level": ""}


async def ollama_tags(gw: Gateway, request: Request) -> Response:
    data = await gw.supervisor().models()
    return JSONResponse({"models": [
        {"name": m["name"], "model": m["name"], "modified_at": ol.timestamp(), "size": m.get("size_bytes", 0),
         "digest": "", "details": _details(m)} for m in data["models"]]})


async def ollama_ps(gw: Gateway, request: Request) -> Response:
    status = await gw.supervisor().status()
    models = {m["name"]: m for m in (await gw.supervisor().models())["models"]}
    rows = {}
    for w in status["workers"]:
        if w["state"] in ("idle", "busy"):
            m = models.get(w["model"], {})
            rows[w["model"]] = {"name": w["model"], "model": w["model"], "size": w["rss_bytes"] + w["vram_bytes"],
                                "digest": "", "details": _details(m),
                                "expires_at": ol.timestamp(_expires_in(w)),
                                "size_vram": w["vram_bytes"], "context_length": m.get("n_ctx", 0)}
    return JSONResponse({"models": list(rows.values())})


def _expires_in(worker: dict[str, Any]) -> float:
    """Seconds until a worker unloads if left idle: its countdown when idle; for good when pinned;
    while busy it is not counting, and Ollama's default keep_alive (5 minutes) stands in."""
    if worker.get("pinned"):
        return ol.FOREVER_S
    left = worker.get("unload_in_s")
    return ol.DEFAULT_KEEP_ALIVE_S if left is None else float(left)


async def ollama_version(gw: Gateway, request: Request) -> Response:
    return JSONResponse({"version": __version__})


# ---- the page, health, metrics ------------------------------------------------------------------


async def status_json(gw: Gateway, request: Request) -> Response:
    client = gw.supervisor()
    status, models = await asyncio.gather(client.status(), client.models())
    recent = [vars(r) for r in gw.recent]
    return JSONResponse({"status": status, "models": models, "recent": recent, "served": gw.served,
                         "gateway": {"version": __version__, "uptime_s": round(time.time() - gw.started, 1)}})


async def health(gw: Gateway, request: Request) -> Response:
    try:
        pong = await gw.supervisor().ping(timeout=2.0)
    except StokerError as exc:
        return JSONResponse({"status": "unavailable", "supervisor": exc.message}, status_code=503)
    return JSONResponse({"status": "ok", "supervisor": pong.get(Key.VERSION)})


async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html")


async def static(request: Request) -> Response:
    name = request.path_params["name"]
    allowed = {"status.js": "text/javascript", "status.css": "text/css"}
    if name not in allowed:
        return Response(status_code=404)
    return FileResponse(STATIC / name, media_type=allowed[name])


async def metrics(gw: Gateway, request: Request) -> Response:
    try:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    except ImportError:
        return Response("the metrics extra is not installed (pip install 'stoker[metrics]')\n", status_code=404)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def create_app(gw: Gateway) -> Starlette:
    def r(path: str, handler: Callable[[Gateway, Request], Awaitable[Response]], api: str,
          methods: list[str], public: bool = False, asks: bool = True) -> Route:
        return Route(path, _route(api, handler, gw, public, asks), methods=methods)

    routes = [
        r("/v1/models", openai_models, "openai", ["GET"]),
        r("/v1/models/{model:path}", openai_models, "openai", ["GET"]),
        r("/v1/chat/completions", openai_chat, "openai", ["POST"]),
        r("/v1/completions", openai_completions, "openai", ["POST"]),
        r("/v1/embeddings", openai_embeddings, "openai", ["POST"]),
        r("/api/chat", ollama_chat, "ollama", ["POST"]),
        r("/api/generate", ollama_generate, "ollama", ["POST"]),
        r("/api/embed", ollama_embed, "ollama", ["POST"]),
        r("/api/tags", ollama_tags, "ollama", ["GET"]),
        r("/api/ps", ollama_ps, "ollama", ["GET"]),
        r("/api/version", ollama_version, "ollama", ["GET"], asks=False),
        r("/status.json", status_json, "ollama", ["GET"]),
        r("/health", health, "ollama", ["GET"], public=True, asks=False),  # for load balancers and `curl`: says nothing private
        Route("/", page, methods=["GET"]),
        Route("/static/{name}", static, methods=["GET"]),
        r("/metrics", metrics, "ollama", ["GET"], asks=False),
    ]
    return Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_found})
