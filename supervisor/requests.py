"""A generate request's life in the supervisor, from acceptance to its last reply.

Pure, like the Scheduler: the event loop feeds events (accepted, dispatched, tokens, the
worker's end or error, the worker exited, cancel, client gone, deadline, shutdown) and carries
out the actions returned (replies to clients, a job or a cancel for a worker, dropping a job from
the scheduler, forgetting a request). The Scheduler decides *where* a request runs; this module
decides *what its client hears* and when the request is over.

States (checked on every change, like WorkerState):

    QUEUED ──dispatched──▶ RUNNING ──end/error──▶ ENDED
      │                     │   ▲                   ▲
      │                     │   └──dispatched──┐    │
      │          worker died│              RESUMING ─┤ cancel, client gone, deadline, retries used
      │                     ▼                        │
      │                 (RESUMING)                   │
      │   cancel, client gone, deadline ▶ CANCELLING ┤ its worker's end, or its worker exited
      └── cancel, client gone, deadline, fail ───────┘

A request in CANCELLING is on a worker that was told to stop it; it is never run again. A
request whose client is gone, or that has had its terminal reply (a deadline), is `silent`:
what its worker still sends goes nowhere.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Hashable, Iterator, Union

from stoker.protocol import messages as m
from stoker.protocol.messages import ErrorCode, InfoState, Key, Message, Reason
from stoker.protocol.validation import EmbedRequest, GenerateRequest
from stoker.supervisor.states import check_transition

ClientId = bytes
RequestKey = tuple[ClientId, Hashable]  # (client, request id): unique among requests in flight


class RequestState(str, Enum):
    QUEUED = "queued"  # accepted; waits for its model's file, its turn, or a worker to load
    RUNNING = "running"  # on a worker, streaming
    RESUMING = "resuming"  # its worker died mid-stream; waits to continue on another
    CANCELLING = "cancelling"  # its worker was told to stop it; waits for that worker's end
    ENDED = "ended"  # had its last reply (or its client is gone): forgotten


_S = RequestState
REQUEST_TRANSITIONS: dict[RequestState, frozenset[RequestState]] = {
    _S.QUEUED: frozenset({_S.RUNNING, _S.ENDED}),
    _S.RUNNING: frozenset({_S.RESUMING, _S.CANCELLING, _S.ENDED}),
    _S.RESUMING: frozenset({_S.RUNNING, _S.ENDED}),
    _S.CANCELLING: frozenset({_S.ENDED}),
    _S.ENDED: frozenset(),
}
WAITING = (_S.QUEUED, _S.RESUMING)  # not on a worker: the scheduler (or a file look) holds them
ON_WORKER = (_S.RUNNING, _S.CANCELLING)


# ---- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    client: ClientId
    message: Message


@dataclass(frozen=True)
class RunOnWorker:
    """Send the job to its worker. `resume`: the text the client has already, to continue from."""

    wid: str
    job_no: int
    body: dict[str, Any]
    resume: str | None = None
    key: RequestKey | None = field(default=None, compare=False)  # for the log
    tokens_sent: int = field(default=0, compare=False)
    embed: bool = False  # an embed job (body: its inputs still to do), not a generate


@dataclass(frozen=True)
class CancelOnWorker:
    wid: str
    job_no: int


@dataclass(frozen=True)
class Unqueue:
    """Take the request out of wherever it waits (its model's file look, or the scheduler's queue)."""

    key: RequestKey


@dataclass(frozen=True)
class Forget:
    """The request is over: log it and count it. `outcome` is a reason or an error code."""

    request: "ActiveRequest"
    outcome: str
    timings: dict[str, float]


RequestAction = Union[Reply, RunOnWorker, CancelOnWorker, Unqueue, Forget]


@dataclass
class ActiveRequest:
    """A generate request in flight, with what its replies need."""

    key: RequestKey
    request: GenerateRequest
    model: str
    max_tokens: int
    accepted: float
    job_no: int
    state: RequestState = RequestState.QUEUED
    worker: str | None = None
    dispatched: float | None = None  # the first dispatch: queued_ms is the first wait, not a resume's
    first_token: float | None = None
    waited_for_load: bool = False
    load_ms: float = 0.0
    seq: int = 0  # tokens the client has (or will have, once flushed), from every worker that ran it
    texts: list[str] = field(default_factory=list)  # their text, to resume from if the worker dies
    # Tokens read from the worker but not yet sent: those read in one batch go in one frame.
    unsent: list[str] = field(default_factory=list)
    unsent_n: int = 0
    unsent_logprobs: list[Any] | None = None  # their entries, for a request that asked for log-probabilities
    # An embed: the vectors made so far, by input index (kept across a worker's death: a resumed
    # job runs the rest), the inputs sent with its last dispatch, and their tokens.
    vectors: dict[int, list[float]] = field(default_factory=dict)
    sent_inputs: list[int] = field(default_factory=list)
    embed_tokens: int = 0
    acknowledged: bool = False  # it has had a reply (every accepted generate gets one at once)
    silent: bool = False  # its client is gone, or has had its terminal reply
    outcome: str = ""  # how it ended, when it was answered before its worker finished (timeout)

    @property
    def client(self) -> ClientId:
        return self.key[0]

    @property
    def rid(self) -> Any:
        return self.request.id

    def to(self, new: RequestState) -> None:
        check_transition(REQUEST_TRANSITIONS, self.state, new, f"request {self.rid!r}")
        self.state = new


def timings(req: ActiveRequest, now: float) -> dict[str, float]:
    def ms(start: float | None, end: float | None) -> float:
        return round((end - start) * 1000, 1) if start is not None and end is not None else 0.0

    return {
        Key.QUEUED_MS: ms(req.accepted, req.dispatched or now),
        Key.LOAD_MS: req.load_ms,
        Key.TTFT_MS: ms(req.accepted, req.first_token),
        Key.TOTAL_MS: ms(req.accepted, now),
    }


class Requests:
    """Every generate request in flight, and the rules of their lives."""

    def __init__(self, instance: str) -> None:
        self.instance = instance  # this supervisor's id, in every info (clients detect restarts by it)
        self.table: dict[RequestKey, ActiveRequest] = {}
        self.by_job: dict[int, RequestKey] = {}
        self.unflushed: set[RequestKey] = set()
        self.deadlines: list[tuple[float, int, RequestKey]] = []  # (when, job_no, key)
        self._job_seq = 0

    # ---- queries -------------------------------------------------------------------------------

    def __contains__(self, key: object) -> bool:
        return key in self.table

    def __len__(self) -> int:
        return len(self.table)

    def __iter__(self) -> Iterator[ActiveRequest]:
        return iter(list(self.table.values()))

    def get(self, key: RequestKey) -> ActiveRequest | None:
        return self.table.get(key)

    def on_worker(self, job_no: int, wid: str) -> ActiveRequest | None:
        """The request a worker's message is about, or None if that message is late (the request
        was answered, or runs elsewhere now after a crash)."""
        key = self.by_job.get(job_no)
        req = self.table.get(key) if key is not None else None
        if req is None or req.worker != wid or req.state not in ON_WORKER:
            return None
        return req

    def cancelling_on(self, wid: str) -> set[RequestKey]:
        """Requests its worker was told to stop: if that worker dies they end, not resume."""
        return {r.key for r in self.table.values() if r.worker == wid and r.state is _S.CANCELLING}

    def next_deadline(self) -> float | None:
        return self.deadlines[0][0] if self.deadlines else None

    def session_of(self, client: ClientId) -> str:
        """This client connection to this supervisor: a new one after the client reconnects or
        the supervisor restarts (libzmq gives each new connection a new routing id)."""
        return f"{self.instance}/{client.hex()}"

    # ---- events from clients -------------------------------------------------------------------

    def accept(self, client: ClientId, request: GenerateRequest, model: str, max_tokens: int,
               now: float) -> ActiveRequest:
        """A valid generate request; the caller checked its id is not in use."""
        key = (client, request.id)
        self._job_seq += 1
        req = ActiveRequest(key, request, model, max_tokens, now, self._job_seq)
        if request.resume_tokens:
            # A continuation of a stream a supervisor that went away began: this one streams on
            # from the client's last token, exactly as after a worker's crash.
            req.seq = request.resume_tokens
            req.texts.append(request.resume_text)
        self.table[key] = req
        self.by_job[req.job_no] = key
        if request.deadline is not None:
            if len(self.deadlines) > 2 * len(self.table) + 1000:
                # Entries of requests that ended stay until their time: keep them bounded.
                self.deadlines = [d for d in self.deadlines if d[2] in self.table]
                heapq.heapify(self.deadlines)
            heapq.heappush(self.deadlines, (now + request.deadline, req.job_no, key))
        return req

    def acknowledge(self, key: RequestKey) -> list[RequestAction]:
        """Every accepted generate is answered at once (clients tell from that whether a
        supervisor that restarted had their request): one that got nothing yet waits for its
        model's file, so it is loading."""
        req = self.table.get(key)
        if req is None or req.acknowledged:
            return []
        req.waited_for_load = True
        return self._info(req, InfoState.LOADING)

    def notify(self, key: RequestKey, loading: bool, position: int = 0) -> list[RequestAction]:
        """Where a waiting request stands: its model is loading, or `position` are ahead of it."""
        req = self.table.get(key)
        if req is None:
            return []
        if loading:
            req.waited_for_load = True
            return self._info(req, InfoState.LOADING)
        return self._info(req, InfoState.QUEUED, position)

    def cancel(self, key: RequestKey, now: float) -> tuple[bool, list[RequestAction]]:
        """A cancel from the request's own client. False if no such request is in flight."""
        req = self.table.get(key)
        if req is None:
            return False, []
        if req.state in WAITING:
            actions: list[RequestAction] = [Unqueue(key), *self._flush(req)]
            if not req.silent:
                usage = {Key.PROMPT_TOKENS: 0, Key.COMPLETION_TOKENS: req.seq}
                actions.append(Reply(req.client, m.end(req.rid, Reason.CANCELLED, usage, timings(req, now))))
            return True, actions + self._forget(req, Reason.CANCELLED.value, now)
        return True, self._stop_on_worker(req)

    def client_gone(self, client: ClientId, now: float) -> list[RequestAction]:
        """The client disconnected: its replies have nowhere to go, so stop spending work on them."""
        actions: list[RequestAction] = []
        for req in [r for r in self.table.values() if r.client == client]:
            req.silent = True
            if req.state in WAITING:
                actions += [Unqueue(req.key), *self._forget(req, "client_gone", now)]
            else:
                actions += self._stop_on_worker(req)
        return actions

    def abandon(self, key: RequestKey, code: ErrorCode, message: str, now: float) -> list[RequestAction]:
        """End the request with an error wherever it stands (its handling hit a bug)."""
        req = self.table.get(key)
        if req is None:
            return []
        if req.state in WAITING:
            return [Unqueue(key), *self.fail(key, code, message, now)]
        actions = [*self._flush(req), *self._final(req, m.error(req.rid, code, message))]
        req.outcome = req.outcome or code.value
        return actions + self._stop_on_worker(req)

    def deadlines_due(self, now: float) -> list[RequestAction]:
        """Requests whose own `deadline` passed end with `timeout`, wherever they stand."""
        actions: list[RequestAction] = []
        while self.deadlines and self.deadlines[0][0] <= now:
            _, job_no, key = heapq.heappop(self.deadlines)
            req = self.table.get(key)
            # One being cancelled is already ending: its end says cancelled, as its client asked.
            if req is not None and req.job_no == job_no and req.outcome == "" and req.state is not _S.CANCELLING:
                message = (f"the request did not finish within its deadline of {req.request.deadline:g} s "
                           f"({req.seq} tokens sent)")
                actions += self.abandon(key, ErrorCode.TIMEOUT, message, now)
        return actions

    def shutdown(self, now: float) -> list[RequestAction]:
        """The drain's grace is over: every request still in flight ends with shutting_down."""
        actions: list[RequestAction] = []
        for key in list(self.table):
            actions += self.fail(key, ErrorCode.SHUTTING_DOWN, "the supervisor shut down before this request finished",
                                 now)
        return actions

    # ---- events from the scheduler and workers -------------------------------------------------

    def dispatched(self, key: RequestKey, wid: str, now: float, load_ms: float) -> list[RequestAction]:
        """The scheduler gave the request to a worker: send it the job (to continue from what the
        client already has, after a crash)."""
        req = self.table[key]
        first = req.dispatched is None
        req.to(_S.RUNNING)
        req.worker = wid
        if first:
            req.dispatched = now
        if req.waited_for_load:
            req.load_ms = load_ms
        r = req.request
        actions: list[RequestAction] = []
        if first:
            actions += self._info(req, InfoState.RUNNING)
        if isinstance(r, EmbedRequest):
            req.sent_inputs = [i for i in range(len(r.inputs)) if i not in req.vectors]
            inputs = {Key.INPUT: [r.inputs[i] for i in req.sent_inputs], Key.NORMALIZE: r.normalize,
                      Key.TRUNCATE: r.truncate}
            return actions + [RunOnWorker(wid, req.job_no, inputs, None, req.key, len(req.vectors), embed=True)]
        body: dict[str, Any] = {**r.sampling, Key.MAX_TOKENS: max(0, req.max_tokens - req.seq)}
        if r.prompt is not None:
            body[Key.PROMPT] = r.prompt
        else:
            body[Key.MESSAGES] = list(r.messages or ())
        actions.append(RunOnWorker(wid, req.job_no, body, "".join(req.texts) if req.texts else None, req.key,
                                   req.seq))
        return actions

    def tokens(self, req: ActiveRequest, text: str, n: int, now: float, logprobs: list | None = None) -> None:
        """Tokens from the request's worker. They wait for flush(): those read together go in one frame."""
        if req.first_token is None:
            req.first_token = now
        if not req.silent:
            req.unsent.append(text)
            req.unsent_n += n
            if logprobs is not None:
                if req.unsent_logprobs is None:
                    req.unsent_logprobs = []
                req.unsent_logprobs.extend(logprobs)
            self.unflushed.add(req.key)
        req.seq += n
        req.texts.append(text)

    def vectors(self, req: ActiveRequest, start: int, vectors: list[list[float]], tokens: int, now: float) -> None:
        """Vectors from an embed's worker, for the inputs `start`.. of those it was sent."""
        if req.first_token is None:
            req.first_token = now
        for k, vector in enumerate(vectors):
            req.vectors[req.sent_inputs[start + k]] = vector
        req.embed_tokens += tokens

    def flush(self) -> list[RequestAction]:
        """Send the tokens read but not yet sent, one frame per request."""
        actions: list[RequestAction] = []
        for key in list(self.unflushed):
            req = self.table.get(key)
            if req is not None:
                actions += self._flush(req)
        self.unflushed.clear()
        return actions

    def ended(self, req: ActiveRequest, reason: Reason, prompt_tokens: int, now: float) -> list[RequestAction]:
        """The worker's `end`: its last tokens, then the end with usage over every worker that ran it.
        An embed's: its result, every input's vector in order."""
        r = req.request
        if isinstance(r, EmbedRequest) and reason is not Reason.CANCELLED:
            if len(req.vectors) != len(r.inputs):
                message = f"the worker ended an embed with {len(req.vectors)} of {len(r.inputs)} vectors"
                return self.fail(req.key, ErrorCode.INTERNAL, message, now)
            vectors = [req.vectors[i] for i in range(len(r.inputs))]
            data = {Key.MODEL: req.model, Key.EMBEDDINGS: vectors,
                    Key.USAGE: {Key.PROMPT_TOKENS: req.embed_tokens}, Key.TIMINGS: timings(req, now)}
            return [*self._final(req, m.result(req.rid, data)), *self._forget(req, reason.value, now)]
        if isinstance(r, EmbedRequest):
            prompt_tokens = req.embed_tokens
        usage = {Key.PROMPT_TOKENS: prompt_tokens, Key.COMPLETION_TOKENS: req.seq}
        actions = [*self._flush(req), *self._final(req, m.end(req.rid, reason, usage, timings(req, now)))]
        return actions + self._forget(req, reason.value, now)

    def fail(self, key: RequestKey, code: ErrorCode, message: str, now: float) -> list[RequestAction]:
        """End the request with an error (from its worker or the scheduler). The caller took it
        off its worker or out of its queue."""
        req = self.table.get(key)
        if req is None:
            return []  # answered already (a job the scheduler still held at shutdown)
        actions = [*self._flush(req), *self._final(req, m.error(req.rid, code, message))]
        return actions + self._forget(req, code.value, now)

    def worker_exited(self, wid: str, now: float) -> list[RequestAction]:
        """Its worker died. A request it was told to stop is over (not worth loading the model
        again for); one it was running waits to resume where its stream stands (the scheduler
        decides where, or fails it when its retries are used up)."""
        actions: list[RequestAction] = []
        for req in [r for r in self.table.values() if r.worker == wid and r.state in ON_WORKER]:
            actions += self._flush(req)
            req.worker = None
            if req.state is _S.CANCELLING:
                if not req.silent:
                    usage = {Key.PROMPT_TOKENS: 0, Key.COMPLETION_TOKENS: req.seq}
                    actions += self._final(req, m.end(req.rid, Reason.CANCELLED, usage, timings(req, now)))
                actions += self._forget(req, Reason.CANCELLED.value, now)
            else:
                req.to(_S.RESUMING)
        return actions

    # ---- internals -----------------------------------------------------------------------------

    def _info(self, req: ActiveRequest, state: InfoState, position: int | None = None) -> list[RequestAction]:
        req.acknowledged = True
        if req.silent:
            return []
        return [Reply(req.client, m.info(req.rid, state, position, self.session_of(req.client), self.instance,
                                         req.model))]

    def _flush(self, req: ActiveRequest) -> list[RequestAction]:
        self.unflushed.discard(req.key)
        if not req.unsent_n:
            return []
        action = Reply(req.client, m.token(req.rid, req.seq - req.unsent_n, req.unsent_n, "".join(req.unsent),
                                           req.unsent_logprobs))
        req.unsent.clear()
        req.unsent_n = 0
        req.unsent_logprobs = None
        return [] if req.silent else [action]

    def _final(self, req: ActiveRequest, message: Message) -> list[RequestAction]:
        """The request's terminal reply (unless its client is gone or was answered); nothing follows it."""
        req.acknowledged = True
        if req.silent:
            return []
        req.silent = True
        return [Reply(req.client, message)]

    def _stop_on_worker(self, req: ActiveRequest) -> list[RequestAction]:
        """Tell its worker to stop it (once); the worker answers with an end (cancelled)."""
        if req.state is _S.CANCELLING:
            return []
        req.to(_S.CANCELLING)
        assert req.worker is not None
        return [CancelOnWorker(req.worker, req.job_no)]

    def _forget(self, req: ActiveRequest, outcome: str, now: float) -> list[RequestAction]:
        req.to(_S.ENDED)
        self.unflushed.discard(req.key)
        del self.table[req.key]
        self.by_job.pop(req.job_no, None)
        return [Forget(req, req.outcome or outcome, timings(req, now))]
