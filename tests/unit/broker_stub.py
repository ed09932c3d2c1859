"""An in-process broker with no sockets and a fake clock (dramatiq's StubBroker is the model).

It is the broker's own state and handlers (BrokerCore, ClientHandlers, WorkerHandlers,
placement.dispatch) driven turn by turn: a test sends client requests and worker messages,
moves the clock, and reads what the broker would have sent. Each turn's changes are written
to a real SQLite store at once, as the writer thread would, so durable replies leave at the
end of the same turn.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from virtbroker.broker import hosts
from virtbroker.broker.client_handlers import ClientHandlers
from virtbroker.broker.core import BrokerCore
from virtbroker.broker.outbox import TO_WORKERS
from virtbroker.broker.placement import dispatch
from virtbroker.broker.store import Store, write_batches
from virtbroker.broker.worker_handlers import WorkerHandlers
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.common import protocol as p
from virtbroker.common.config import Config
from virtbroker.common.errors import error_from_code

CLIENT = "client"  # the destination handle of every client request here


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.wall_now = 1.7e9

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.wall_now

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall_now += seconds


class StubBroker:
    def __init__(self, state_dir: Path, **config):
        self.clock = FakeClock()
        self.config = Config(state_dir=str(state_dir), **config)
        self.store = Store(self.config.state_dir)
        self.core = BrokerCore(self.config, self.store, self.clock)
        self.core.load()
        self.clients = ClientHandlers(self.core, "inproc://events")
        self.workers = WorkerHandlers(self.core)
        self.replies: list[p.Message] = []
        self.to_workers: dict[bytes, list[p.Message]] = defaultdict(list)  # by connection identity
        self._request_ids = iter(range(1, 10**9))

    # -- driving it
    def turn(self) -> None:
        """One loop turn: expiry, dispatch, waits, then this turn's batch written and sent."""
        now = self.clock.monotonic()
        self.core.tick(now)
        hosts.check(self.core, now)
        dispatch(self.core, now)
        self.core.answer_waiters(now)
        batch = self.core.take_batch()
        if batch is not None:
            write_batches(self.store.db, [batch])
        entries, _events = self.core.outbox.hand_over(None, self.core.events.take())
        self._deliver(entries + self.core.outbox.take_now())

    def _deliver(self, entries) -> None:
        for dest, frames in entries:
            if dest is TO_WORKERS:
                self.to_workers[frames[0]] += p.unbatch(p.decode(frames[1:], p.WORKER_VERSION))
            else:
                self.replies += p.unbatch(p.decode(frames[1:], p.CLIENT_VERSION))

    def call(self, kind: type[p.Message], **fields):
        """A client request, answered in one turn: its result, or the typed error raised."""
        request_id = next(self._request_ids)
        self.clients.on_message([b"c", *p.encode(kind(request_id=request_id, **fields))], CLIENT)
        self.turn()
        reply = next(r for r in self.replies if r.request_id == request_id)
        self.replies.remove(reply)
        if isinstance(reply, p.Error):
            raise error_from_code(reply.code, reply.message)
        return reply.result

    def call_many(self, requests: list[p.Message]) -> list:
        """Requests handled in one turn (one batch message), as a busy broker sees them."""
        (frames,) = p.batch_frames([p.encode(r) for r in requests])
        self.clients.on_message([b"c", *frames], CLIENT)
        self.turn()
        ids = {r.request_id for r in requests}
        replies = [r for r in self.replies if r.request_id in ids]
        self.replies = [r for r in self.replies if r.request_id not in ids]
        return [r.result if isinstance(r, p.Ok) else error_from_code(r.code, r.message) for r in replies]

    def define(self, name: str, memory_mib: int = 64) -> dict:
        return self.call(p.Define, xml=minimal_domain_xml(name, memory_mib=memory_mib))

    def submit(self, domain: str, op: str, **fields) -> dict:
        return self.call(p.Submit, domain=domain, op=op, **fields)

    def job(self, job_id: int) -> dict:
        return self.call(p.GetJob, job_id=job_id)

    def worker_says(self, identity: str, msg: p.Message) -> None:
        self.workers.on_message([identity.encode(), *p.encode(msg)])

    def hello(self, worker_id: str, host_id: str = "h1", slots: int = 4, priority_slots: int = 0,
              memory_mib: int = 0, role: str = "lifecycle", **kw) -> None:
        self.worker_says(worker_id, p.Hello(
            worker_id=worker_id, role=role, host_id=host_id, uri="qemu:///system", slots=slots,
            priority_slots=priority_slots, memory_mib=memory_mib, **kw,
        ))
        self.turn()

    def assignments(self, worker_id: str) -> list[p.JobAssignment]:
        """Job assignments sent to a worker so far (taken out of its inbox)."""
        inbox = self.to_workers[worker_id.encode()]
        jobs = [m for m in inbox if isinstance(m, p.JobAssignment)]
        self.to_workers[worker_id.encode()] = [m for m in inbox if not isinstance(m, p.JobAssignment)]
        return jobs

    def report(self, worker_id: str, a: p.JobAssignment, ok: bool = True, state: str | None = "running",
               **kw) -> p.ResultAck:
        fields = dict(worker_id=worker_id, job_id=a.job_id, lease_id=a.lease_id, epoch=a.epoch, ok=ok,
                      domain_state=state)
        fields.update(kw)
        self.worker_says(worker_id, p.Result(**fields))
        self.turn()
        inbox = self.to_workers[worker_id.encode()]
        ack = next(m for m in reversed(inbox) if isinstance(m, p.ResultAck) and m.job_id == a.job_id)
        inbox.remove(ack)
        return ack

    def close(self) -> None:
        self.store.close()
