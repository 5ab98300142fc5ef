"""The client side of protocol v1, with no I/O in it: what both clients (`Client`, `AsyncClient`)
do with what they send and what they read, so that the two cannot drift apart.

Each wrapper owns a socket. It asks the core for the frame of a new request, hands it every
frame it reads (`receive`), and sends whatever the core gives back to send; it tells the core
when its connection dropped (`disconnected`, from a socket monitor) and when a request was
silent too long (then it sends the `probe` ping the core makes).

Surviving a supervisor that restarts is decided here. The supervisor forgets a connection's
requests when the connection closes (it cancels them), and a new supervisor never had them.
From a `ping` result, which names the supervisor (`instance`) and this connection to it
(`session`), the core tells which requests are lost:
- a generate whose `info` named another session than the one that answers now; and
- any request sent before the ping that had no reply at all when the ping's result came: the
  supervisor answers every generate, cancel, status and ping at once, in the order it reads
  them, so one that reached it would have been answered first.
Loads, unloads and `models` are answered later; one of them is sent again when the session it
was sent on (or an unknown one) is no longer the one that answers. All of them can safely run
twice, and a copy that the supervisor still has is refused as a duplicate id (ignored).

A lost generate is sent again as a continuation: the same keys, plus `resume` with the text and
the token count received so far, and what is left of its `deadline`. The supervisor streams on
from there, so its consumer sees one stream, `seq` contiguous. A lost `shutdown` is not sent
again (its supervisor is gone, as asked); a lost `cancel` ends its target as cancelled instead
of sending the target again.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from stoker.protocol import messages as m
from stoker.protocol import results
from stoker.protocol.codec import decode, encode
from stoker.protocol.errors import BadRequest, Internal, StokerError, Timeout, Unreachable
from stoker.protocol.messages import Event, Key, Message, Op, Reason, RequestId

# Replies can be larger than requests (tokens merged for a slow reader, a long status); a client
# must not choke on a legitimate one.
MAX_REPLY_BYTES = 64 * 1024 * 1024
# How often one request may be sent again after it was lost; past it, the connection keeps
# losing it (a frame the supervisor drops the connection for, say) and it fails with Unreachable.
MAX_RESENDS = 5
# Ops the supervisor answers as it reads them; the others (load, unload, models) answer later.
_ANSWERED_AT_ONCE = frozenset({Op.GENERATE, Op.EMBED, Op.CANCEL, Op.STATUS, Op.PING, Op.SHUTDOWN})
# Ops that run on a worker: their `info` names the session that has them.
_JOBS = frozenset({Op.GENERATE, Op.EMBED})

Reply = Message | StokerError  # a reply for its request's reader, or what the reader raises


@dataclass
class Pending:
    """A request sent and not yet answered (for a generate: not yet ended)."""

    id: RequestId
    op: Op
    keys: dict[str, Any]  # as first sent: what a resend starts from
    sent_no: int  # its place among this client's sends (the last one, if sent again)
    first_sent: float
    session: str | None  # generate: the session its `info` named; others: the one known when sent
    quiet: bool = False  # nobody reads its reply (a cancel sent when a stream is dropped)
    probe: bool = False  # a ping the core made to check the supervisor (its result is not delivered)
    replied: bool = False
    texts: list[str] = field(default_factory=list)  # generate: the completion so far
    tokens: int = 0
    resends: int = 0
    cancel_wanted: bool = False  # a cancel of it was lost with it: end it as cancelled
    held: bool = False  # made but not yet sent (the socket had no room): it cannot have been lost


@dataclass
class Step:
    """What the wrapper does after `receive`: frames to send (request id, frame), and replies
    to hand to each request's reader, in order."""

    send: list[tuple[RequestId, bytes]] = field(default_factory=list)
    replies: list[tuple[RequestId, Reply]] = field(default_factory=list)


class ClientCore:
    """Requests in flight on one connection, and what to do about a supervisor that went away."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._ids = itertools.count(1)
        self._sends = itertools.count(1)
        self._clock = clock
        # In the order they were (last) sent, so a ping's result looks only at those before it.
        self.pending: dict[RequestId, Pending] = {}
        self.session: str | None = None  # this connection, as the supervisor last named it
        self.instance: str | None = None
        self.probing: RequestId | None = None  # the probe in flight
        self.probe_sent = 0.0
        self._probe_from: float | None = None  # a probe lost with its connection: when it was sent
        self.max_message_bytes: int | None = None  # the supervisor's, once a ping said it
        self.last_pong = 0.0  # when a probe was last answered

    # ---- sending -------------------------------------------------------------------------------

    def request(self, op: Op, keys: Mapping[str, Any], quiet: bool = False) -> tuple[RequestId, bytes]:
        """A new request: its id and frame. BadRequest if it cannot be encoded (nothing is kept)."""
        rid = next(self._ids)
        keys = {k: v for k, v in keys.items() if v is not None}
        frame = self._frame(op, rid, keys)
        too_big = self._too_big(rid, frame)
        if too_big is not None:
            raise too_big
        self.pending[rid] = Pending(rid, op, keys, next(self._sends), self._clock(),
                                    None if op in _JOBS else self.session, quiet=quiet)
        return rid, frame

    def probe(self) -> tuple[RequestId, bytes] | None:
        """A ping to check the supervisor, unless one is in flight already (then None)."""
        if self.probing is not None:
            return None
        rid, frame = self.request(Op.PING, {})
        self.pending[rid].probe = True
        self.probing, self.probe_sent = rid, self._probe_from or self._clock()
        self._probe_from = None
        return rid, frame

    def probe_failed(self) -> None:
        """The probe went unanswered for too long; a later one may be sent."""
        if self.probing is not None:
            self.forget(self.probing)

    def forget(self, rid: RequestId) -> None:
        """Nobody wants this request's replies any more (cancelled, timed out): they are dropped."""
        self.pending.pop(rid, None)
        if rid == self.probing:
            self.probing = None

    def in_flight(self, rid: RequestId) -> bool:
        return rid in self.pending

    def hold(self, rid: RequestId) -> None:
        """The wrapper could not send `rid` yet (no room): until `sent`, no reply is expected."""
        req = self.pending.get(rid)
        if req is not None:
            req.held = True

    def sent(self, rid: RequestId) -> None:
        """A held request went out now: it takes its place among the sends from here."""
        req = self.pending.get(rid)
        if req is not None and req.held:
            req.held = False
            self._restamp(req)

    def _restamp(self, req: Pending) -> None:
        req.sent_no = next(self._sends)
        del self.pending[req.id]
        self.pending[req.id] = req  # kept in send order

    @staticmethod
    def _frame(op: Op, rid: RequestId, keys: Mapping[str, Any]) -> bytes:
        """A request, encoded; what cannot be encoded (a lone surrogate, an odd type) is BadRequest."""
        try:
            return encode(m.request(op, rid, **keys))
        except (UnicodeError, TypeError, ValueError, OverflowError) as exc:
            raise BadRequest(f"the request cannot be encoded: {exc}", rid) from None

    # ---- receiving -----------------------------------------------------------------------------

    def receive(self, frame: bytes) -> Step:
        """One frame from the supervisor. An unreadable one raises Internal (whose reply it was
        cannot be known: the wrapper fails every request in flight)."""
        msg = decode_reply(frame)
        step = Step()
        rid = msg.get(Key.ID)
        req = self.pending.get(rid) if rid is not None else None
        if req is None:
            return step  # an error about no request, or a request nobody waits for any more
        req.replied = True
        ev = msg.get(Key.EV)
        if ev == Event.INFO.value:
            if isinstance(msg.get(Key.MODEL), str):
                # Sent again, it must run on the same model, not on a new supervisor's default.
                req.keys.setdefault(Key.MODEL, msg[Key.MODEL])
            session = msg.get(Key.SESSION)
            if isinstance(session, str):
                req.session = session
                self._seen_session(session, msg.get(Key.INSTANCE), step)
        elif ev == Event.TOKEN.value and isinstance(msg.get(Key.TEXT), str):
            req.texts.append(msg[Key.TEXT])
            req.tokens += int(msg.get(Key.N, 1))
        terminal = m.is_terminal(msg)
        if terminal:
            del self.pending[rid]
        if req.probe or (req.op is Op.PING and ev == Event.RESULT.value):
            if rid == self.probing:
                self.probing = None
                self.last_pong = self._clock()
            data = msg.get(Key.DATA)
            if isinstance(data, dict) and isinstance(data.get(Key.SESSION), str):
                self._pong(req, data[Key.SESSION], data.get(Key.INSTANCE), step, data.get(Key.MAX_MESSAGE_BYTES))
        if not req.quiet and not req.probe:
            step.replies.append((rid, msg))
        return step

    def disconnected(self) -> None:
        """The connection dropped (a socket monitor saw it): whatever the supervisor had of this
        connection is gone. What to send again is decided once a probe is answered; a session
        we knew is no longer ours. A probe in flight went with the connection: the next one
        replaces it, keeping its sending time (how long the supervisor has had to answer)."""
        self.session = None
        if self.probing is not None:
            sent = self.probe_sent
            self.forget(self.probing)
            self._probe_from = sent

    def _seen_session(self, session: str, instance: Any, step: Step, recover: bool = True) -> None:
        """A reply named this connection's session: requests a different session had are lost."""
        if isinstance(instance, str):
            self.instance = instance
        if session == self.session:
            return
        self.session = session
        if recover:
            self._recover_all([req for req in self.pending.values()
                               if req.op in _JOBS and req.session is not None and req.session != session],
                              step)

    def _pong(self, ping: Pending, session: str, instance: Any, step: Step, limit: Any = None) -> None:
        """A ping's result: every request sent before it has had its immediate reply by now, if
        the supervisor that answers had it."""
        # With the session unchanged, requests sent after the ping cannot be lost, and those are
        # the end of `pending` (send order): the scan stops at the ping, so pings pipelined behind
        # each other do not each look at all those sent after them.
        changed = session != self.session
        self._seen_session(session, instance, step, recover=False)  # all at once, below
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            self.max_message_bytes = limit
        lost = []
        for req in self.pending.values():
            if req.sent_no > ping.sent_no and not changed:
                break
            if req.probe or req.id == ping.id or req.held:
                continue
            if req.op in _JOBS and req.session is not None:
                gone = req.session != session
            elif req.op in _ANSWERED_AT_ONCE:
                gone = req.sent_no < ping.sent_no and not req.replied
            else:  # answered later: sent again unless it was sent on this very session
                gone = req.sent_no < ping.sent_no and req.session != session
            if gone:
                lost.append(req)
        self._recover_all(lost, step)

    def _recover_all(self, lost: list[Pending], step: Step) -> None:
        """Lost requests: a lost cancel's target that was lost too ends as cancelled (so its
        cancels are looked at first); the rest are sent again."""
        ids = {req.id for req in lost}
        for req in lost:
            target = self.pending.get(req.keys.get(Key.TARGET)) if req.op is Op.CANCEL else None
            if target is not None and target.id in ids:
                target.cancel_wanted = True
        for req in sorted(lost, key=lambda r: r.op is not Op.CANCEL):  # cancels first: they name targets
            if req.id in self.pending:
                self._recover(req, step)

    def _recover(self, req: Pending, step: Step) -> None:
        """A request the supervisor no longer has: send it again, or end it as it must end."""
        rid = req.id
        if req.op is Op.SHUTDOWN:  # its supervisor is gone, as asked: do not stop the new one
            del self.pending[rid]
            step.replies.append((rid, m.result(rid, results.stopping())))
            return
        target = self.pending.get(req.keys.get(Key.TARGET)) if req.op is Op.CANCEL else None
        if req.op is Op.CANCEL and (target is None or target.cancel_wanted):
            # Its target is gone too (it ends as cancelled), or had ended: nothing to send.
            del self.pending[rid]
            if not req.quiet:
                step.replies.append((rid, m.result(rid, results.cancelled(target is not None))))
            return
        if req.cancel_wanted:
            del self.pending[rid]
            usage = {Key.PROMPT_TOKENS: 0, Key.COMPLETION_TOKENS: req.tokens}
            timings = {Key.QUEUED_MS: 0.0, Key.LOAD_MS: 0.0, Key.TTFT_MS: 0.0, Key.TOTAL_MS: 0.0}
            step.replies.append((rid, m.end(rid, Reason.CANCELLED, usage, timings)))
            return
        failure = self._resend(req)
        if isinstance(failure, StokerError):
            del self.pending[rid]
            if not req.quiet:
                step.replies.append((rid, failure))
        else:
            step.send.append((rid, failure))

    def _resend(self, req: Pending) -> bytes | StokerError:
        """The frame that sends `req` again, or why it cannot be."""
        if req.resends >= MAX_RESENDS:
            return Unreachable(f"request {req.id!r} was lost {req.resends + 1} times (the supervisor restarted "
                               "or dropped the connection each time)", req.id)
        keys = dict(req.keys)
        if req.op in _JOBS:  # an embed is sent again whole: a new supervisor has none of its vectors
            if req.tokens:
                keys[Key.RESUME] = {Key.TEXT: "".join(req.texts), Key.TOKENS: req.tokens}
            deadline = keys.get(Key.DEADLINE)
            if deadline is not None:
                left = deadline - (self._clock() - req.first_sent)
                if left <= 0:
                    return Timeout(f"request {req.id!r} passed its deadline of {deadline:g} s while the "
                                   "supervisor restarted", req.id)
                keys[Key.DEADLINE] = left
        frame = self._frame(req.op, req.id, keys)
        too_big = self._too_big(req.id, frame)
        if too_big is not None:  # a continuation carries the text so far, too
            return too_big
        req.resends += 1
        req.replied = False
        req.session = None if req.op in _JOBS else self.session
        self._restamp(req)
        return frame

    def _too_big(self, rid: RequestId, frame: bytes) -> BadRequest | None:
        """A frame over the supervisor's max_message_bytes (known from a ping) would be refused,
        or, past twice that, close the connection and with it everything in flight: never sent."""
        if self.max_message_bytes is None or len(frame) <= self.max_message_bytes:
            return None
        return BadRequest(f"the request is {len(frame)} bytes encoded, more than the supervisor reads "
                          f"(max_message_bytes {self.max_message_bytes})", rid)


def decode_reply(frame: bytes) -> Message:
    """A reply frame as a map, or Internal."""
    try:
        msg = decode(frame, MAX_REPLY_BYTES)
    except Exception as exc:
        raise Internal(f"the supervisor sent a reply this client cannot read: {exc}") from None
    if not isinstance(msg, dict):
        raise Internal("the supervisor sent a reply that is not a map")
    return msg
