"""Events: every change gets the next sequence number; only topics someone listens to are built."""

from __future__ import annotations

from virtbroker.broker.registry import DomainRecord
from virtbroker.broker.scheduler import Job
from virtbroker.common import protocol as p

TOPICS = (b"domain", b"job")


class Events:
    """The event sequence and the events of the current loop turn.

    `seq` counts every event, sent or not, so a subscriber sees a gap only where it was not
    listening. Events leave with the replies of the batch that holds their changes (Outbox).
    """

    def __init__(self, seq: int):
        self.seq = seq
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

    def domain(self, record: DomainRecord, event: str) -> None:
        self.seq += 1
        if not self.listening[b"domain"]:
            return  # its seq is spent all the same
        self.pending.append(
            p.DomainEvent(
                seq=self.seq, uuid=record.uuid, name=record.name, event=event, state=record.state,
                host_id=record.host_id,
            )
        )

    def job(self, job: Job) -> None:
        self.seq += 1
        if not self.listening[b"job"]:
            return
        self.pending.append(
            p.JobEvent(seq=self.seq, job_id=job.job_id, uuid=job.uuid, op=job.op, state=job.state, error=job.error)
        )

    def take(self) -> list[p.Message]:
        taken, self.pending = self.pending, []
        return taken
