"""Requests in flight, as the event loop tracks them between arrival and terminal reply."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stoker.protocol.messages import Op
from stoker.protocol.validation import GenerateRequest
from stoker.supervisor.outbox import ClientId

Key_ = tuple[ClientId, Any]  # (client identity, request id): unique among requests in flight


@dataclass
class ActiveRequest:
    """A generate request in flight, with what its replies need."""

    client: ClientId
    request: GenerateRequest
    model: str
    max_tokens: int
    accepted: float
    job_no: int
    worker: str | None = None
    dispatched: float | None = None
    first_token: float | None = None
    waited_for_load: bool = False
    load_ms: float = 0.0
    seq: int = 0  # tokens sent to the client so far
    texts: list[str] = field(default_factory=list)  # their text, to resume from if the worker dies
    # Tokens read from the worker but not yet sent: those read in one batch go in one frame.
    unsent: list[str] = field(default_factory=list)
    unsent_n: int = 0
    running_sent: bool = False
    acknowledged: bool = False  # it has had a reply (every accepted generate gets one at once)
    client_gone: bool = False
    cancelled: bool = False  # someone asked for it to stop (a cancel, or its client left)
    cancel_sent: bool = False  # the worker now holding it was told
    outcome: str = ""  # how it ended, when it was answered before its worker finished (timeout)


@dataclass
class PendingOp:
    """A load or unload waiting for its workers."""

    client: ClientId
    op: Op
    model: str
    pin: bool = False  # a load that pins the model
