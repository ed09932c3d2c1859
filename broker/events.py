"""Events: every change gets the next sequence number; only topics someone listens to are built."""

from __future__ import annotations

from collections.abc import Callable

import msgpack

from virtbroker.broker.registry import DomainRecord
from virtbroker.broker.scheduler import Job
from virtbroker.common import protocol as p

TOPICS = (b"domain", b"job", b"host")


class Events:
    """The event sequence and the events of the current loop turn.

    Every event is built and kept (`keep(seq, blob)`, the store's event history, for replay);
    only those of topics someone listens to are published. Events leave with the replies of
    the batch that holds their changes (Outbox), so none describes anything not on disk.
    """

    def __init__(self, seq: int, keep: Callable[[int, bytes], None] = lambda seq, blob: None):
        self.seq = seq
        self.keep = keep
        self.pending: list[p.Message] = []  # this turn's events, not yet handed to the outbox
        self.subscriptions: set[bytes] = set()  # topic prefixes subscribers asked for
        self.listening = dict.fromkeys(TOPICS, False)  # per topic: does any subscriber want it

    def subscribe(self, prefix: bytes) -> None:
        self.subscriptions.add(prefix)
        self._update()

    def unsubscribe(self, prefix: bytes) -> None:
        self.subscriptions.discard(prefix)
        self._update()

    def _update(self) -> None:
        self.listening = {
            topic: any(topic.startswith(prefix) for prefix in self.subscriptions) for topic in self.listening
        }

    def domain(self, record: DomainRecord, event: str, reason: str | None = None) -> None:
        self.seq += 1
        self._add(b"domain", p.DomainEvent(
            seq=self.seq, uuid=record.uuid, name=record.name, event=event, state=record.state, host_id=record.host_id,
            reason=reason,
        ))

    def host(self, host_id: str, state: str, reason: str | None = None) -> None:
        self.seq += 1
        self._add(b"host", p.HostEvent(seq=self.seq, host_id=host_id, state=state, reason=reason))

    def job(self, job: Job) -> None:
        self.seq += 1
        self._add(b"job", p.JobEvent(
            seq=self.seq, job_id=job.job_id, uuid=job.uuid, op=job.op, state=job.state, error=job.error,
        ))

    def _add(self, topic: bytes, event: p.DomainEvent | p.JobEvent | p.HostEvent) -> None:
        self.keep(event.seq, p.pack([event.KIND, event.body()]))
        if self.listening[topic]:
            self.pending.append(event)

    @staticmethod
    def replayed(blob: bytes) -> dict:
        """A kept event as the `events` reply carries it: its fields and its kind (`type`)."""
        kind, body = msgpack.unpackb(blob, raw=False)
        return {"type": kind, **body}

    def take(self) -> list[p.Message]:
        taken, self.pending = self.pending, []
        return taken
