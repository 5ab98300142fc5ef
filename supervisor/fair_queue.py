"""One model's waiting requests, served fairly: higher priority first, then round-robin over clients.

A batch job that queues 10,000 prompts gets one turn in each round, like every other client, so an
interactive request waits behind at most one job per busy client, not behind the whole batch.
When the caller says how many requests each client has running (workers with several slots),
a free slot goes first to a waiting client with fewer running: one that holds every slot does
not take the next one from a client that holds none.
Within one client, requests keep their order. Requests put back after their worker died go before
everything (they were running already).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Hashable, Iterator, Mapping

Key = Hashable


class FairQueue:
    def __init__(self) -> None:
        self._urgent: deque[Key] = deque()
        # priority -> client -> that client's requests; the first client is served next
        self._levels: dict[int, OrderedDict[Hashable, deque[Key]]] = {}
        self._where: dict[Key, tuple[int, Hashable] | None] = {}  # None: urgent
        self._per_client: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __bool__(self) -> bool:
        return bool(self._where)

    def __contains__(self, key: Key) -> bool:
        return key in self._where

    def count(self, client: Hashable) -> int:
        """How many of this client's requests wait (put-back ones not counted)."""
        return self._per_client.get(client, 0)

    def push(self, key: Key, client: Hashable, priority: int = 0) -> None:
        level = self._levels.setdefault(priority, OrderedDict())
        level.setdefault(client, deque()).append(key)
        self._where[key] = (priority, client)
        self._per_client[client] = self._per_client.get(client, 0) + 1

    def _uncount(self, client: Hashable) -> None:
        left = self._per_client[client] - 1
        if left:
            self._per_client[client] = left
        else:
            del self._per_client[client]

    def push_front(self, key: Key) -> None:
        """Before everything else: a request that was running when its worker died."""
        self._urgent.appendleft(key)
        self._where[key] = None

    def first_urgent(self) -> Key | None:
        """The request put first in line (after a crash) that is served next, if any."""
        return self._urgent[0] if self._urgent else None

    def pop(self, running: Mapping[Hashable, int] | None = None) -> Key:
        """The next request to serve. `running`: requests each client has running now (absent: 0);
        among the top priority's clients, the first in the rotation with the fewest. Raises
        IndexError when empty."""
        if self._urgent:
            key = self._urgent.popleft()
        else:
            if not self._levels:
                raise IndexError("pop from an empty FairQueue")
            priority = max(self._levels)
            level = self._levels[priority]
            client = next(iter(level))
            if running:
                # Only clients with something running can be passed over, so this looks at most
                # at as many clients as there are running requests, plus one.
                fewest = None
                for other in level:
                    n = running.get(other, 0)
                    if fewest is None or n < fewest:
                        client, fewest = other, n
                    if n == 0:
                        break
            mine = level[client]
            key = mine.popleft()
            self._uncount(client)
            if mine:
                level.move_to_end(client)  # its next one waits for everyone else's turn
            else:
                del level[client]
                if not level:
                    del self._levels[priority]
        del self._where[key]
        return key

    def remove(self, key: Key) -> None:
        where = self._where.pop(key)
        if where is None:
            self._urgent.remove(key)
            return
        priority, client = where
        level = self._levels[priority]
        level[client].remove(key)
        self._uncount(client)
        if not level[client]:
            del level[client]
            if not level:
                del self._levels[priority]

    def position(self, key: Key) -> int:
        """How many requests are served before this one, if nothing else arrives."""
        where = self._where[key]
        if where is None:
            return list(self._urgent).index(key)
        priority, client = where
        ahead = len(self._urgent)
        ahead += sum(len(q) for p, level in self._levels.items() if p > priority for q in level.values())
        level = self._levels[priority]
        index = level[client].index(key)
        before = True  # clients earlier in the rotation get one more turn than those after
        for other, queue in level.items():
            if other == client:
                before = False
                continue
            ahead += min(len(queue), index + 1 if before else index)
        return ahead + index

    def __iter__(self) -> Iterator[Key]:
        """In the order they would be served."""
        yield from self._urgent
        for priority in sorted(self._levels, reverse=True):
            queues = [deque(q) for q in self._levels[priority].values()]
            while queues:
                for q in list(queues):
                    yield q.popleft()
                    if not q:
                        queues.remove(q)
