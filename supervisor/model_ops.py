"""`load` and `unload` requests waiting for their workers: who asked, and their answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stoker.protocol import messages as m
from stoker.protocol import results
from stoker.protocol.errors import UnknownModel
from stoker.protocol.messages import ErrorCode, Message, Op
from stoker.supervisor.config import Config
from stoker.supervisor.requests import ClientId, RequestKey
from stoker.workers.demo_model import DEMO_MODEL_NAME, INSTALL_HINT


def check_model(config: Config, name: str, rid: Any) -> None:
    """UnknownModel unless the model is configured."""
    if name in config.models:
        return
    if name == config.supervisor.default_model == DEMO_MODEL_NAME:
        raise UnknownModel(f"no model is configured and the demo model is not installed: {INSTALL_HINT}", rid)
    raise UnknownModel(f"model '{name}' not found; `stoker models` lists what is configured", rid)


@dataclass
class PendingOp:
    client: ClientId
    op: Op
    model: str
    pin: bool = False  # a load that pins the model
    keep_alive: float | None = None  # a load's: how long the model then stays idle


class ModelOps:
    def __init__(self) -> None:
        self.pending: dict[RequestKey, PendingOp] = {}

    def __contains__(self, key: object) -> bool:
        return key in self.pending

    def get(self, key: RequestKey) -> PendingOp | None:
        return self.pending.get(key)

    def add(self, client: ClientId, rid: Any, op: Op, model: str, pin: bool,
            keep_alive: float | None = None) -> RequestKey:
        key = (client, rid)
        self.pending[key] = PendingOp(client, op, model, pin, keep_alive)
        return key

    def answered(self, key: RequestKey) -> tuple[ClientId, Message] | None:
        """Its workers are ready (or gone): the reply, or None if the op is no longer waiting."""
        op = self.pending.pop(key, None)
        if op is None:
            return None
        data = results.loaded(op.model) if op.op is Op.LOAD else results.unloaded(op.model)
        return op.client, m.result(key[1], data)

    def fail(self, key: RequestKey, code: ErrorCode, message: str) -> tuple[ClientId, Message] | None:
        op = self.pending.pop(key, None)
        return None if op is None else (op.client, m.error(key[1], code, message))

    def client_gone(self, client: ClientId) -> list[RequestKey]:
        keys = [k for k in self.pending if k[0] == client]
        for key in keys:
            del self.pending[key]
        return keys
