"""What the broker sends at the end of a loop turn, and what waits for the disk first.

Replies that depend on nothing unwritten (reads, errors, routing) leave at the end of the
turn. The rest (acknowledged changes, job assignments, events) leave only when the batch
holding their changes is on disk (group commit): each turn's durable messages and events
are handed over with that turn's batch and released when the writer reports it done.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from virtbroker.common import protocol as p

# The destination of every message for a worker; the identity of the worker's connection is
# the message's first frame. A client's messages go to the endpoint they came in on (a
# ZeroMQ socket or a local connection: an opaque handle here), also after that identity.
TO_WORKERS = "workers"

Entry = tuple[Any, list[bytes]]


class Outbox:
    def __init__(self) -> None:
        self.now: list[Entry] = []  # leaves at the end of this turn
        self.durable: list[Entry] = []  # leaves once this turn's changes are on disk
        # (batch_id, durable entries, events) handed to the writer, oldest first
        self.in_flight: deque[tuple[int, list[Entry], list[p.Message]]] = deque()

    def put(self, dest: Any, frames: list[bytes], durable: bool = False) -> None:
        (self.durable if durable else self.now).append((dest, frames))

    def take_now(self) -> list[Entry]:
        taken, self.now = self.now, []
        return taken

    def hand_over(self, batch_id: int | None, events: list[p.Message]) -> tuple[list[Entry], list[p.Message]]:
        """End of a turn. With a batch (its id), this turn's durable messages and events wait
        for it; with none, they wait for the last batch still being written, if any, to keep
        their order; otherwise they may leave now, and are returned."""
        durable, self.durable = self.durable, []
        if batch_id is not None:
            self.in_flight.append((batch_id, durable, events))
            return [], []
        if self.in_flight:
            self.in_flight[-1][1].extend(durable)
            self.in_flight[-1][2].extend(events)
            return [], []
        return durable, events

    def release(self, written_id: int) -> tuple[list[Entry], list[p.Message]]:
        """Everything that waited for batches up to written_id, in order."""
        out: list[Entry] = []
        events: list[p.Message] = []
        while self.in_flight and self.in_flight[0][0] <= written_id:
            _, entries, evs = self.in_flight.popleft()
            out += entries
            events += evs
        return out, events

    def abandon(self) -> list[Entry]:
        """A broker that lost the lead: every message still waiting for the disk, taken out
        (none may leave as it is: the change it reports may not be stored)."""
        out = [entry for _, entries, _ in self.in_flight for entry in entries] + self.durable
        self.in_flight.clear()
        self.durable = []
        return out

    def release_all(self) -> tuple[list[Entry], list[p.Message]]:
        """At shutdown, once the writer has written everything."""
        out, events = self.release(self.in_flight[-1][0]) if self.in_flight else ([], [])
        out += self.durable + self.now
        self.durable, self.now = [], []
        return out, events
