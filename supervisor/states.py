"""Named states of workers and jobs, and the transitions allowed between them."""

from __future__ import annotations

from enum import Enum


class InvalidTransition(RuntimeError):
    """A state change the state machine does not allow: a bug in the caller."""


class WorkerState(str, Enum):
    STARTING = "starting"  # process spawned, not yet heard from
    LOADING = "loading"  # process said hello and is loading its model
    IDLE = "idle"  # model loaded, no request at all
    BUSY = "busy"  # running one request or more (up to its slots)
    STOPPING = "stopping"  # asked to exit (or being killed); gone once its process is reaped


WORKER_TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STARTING: frozenset({WorkerState.LOADING, WorkerState.STOPPING}),
    WorkerState.LOADING: frozenset({WorkerState.IDLE, WorkerState.STOPPING}),
    WorkerState.IDLE: frozenset({WorkerState.BUSY, WorkerState.STOPPING}),
    WorkerState.BUSY: frozenset({WorkerState.IDLE, WorkerState.STOPPING}),
    WorkerState.STOPPING: frozenset(),
}


class JobState(str, Enum):
    QUEUED = "queued"  # waiting for a worker of its model
    RUNNING = "running"  # dispatched to a worker


JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING}),
    JobState.RUNNING: frozenset({JobState.QUEUED}),  # back to the queue when its worker dies early
}


def check_transition(table: dict, current: Enum, new: Enum, what: str) -> None:
    if new not in table[current]:
        raise InvalidTransition(f"{what}: {current.value} -> {new.value} is not allowed")
