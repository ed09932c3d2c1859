"""Durable broker state in SQLite (WAL, fsync on commit), written as one group commit per loop batch."""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import sqlite3
import threading
from dataclasses import dataclass, field
from typing import Protocol

import msgpack
import zmq

from virtbroker.broker.registry import DomainRecord
from virtbroker.broker.scheduler import Job
from virtbroker.common import protocol as p

SCHEMA = """
CREATE TABLE IF NOT EXISTS domains (
    uuid TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    xml TEXT NOT NULL,
    state TEXT NOT NULL,
    host_id TEXT,
    epoch INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    live_xml TEXT
);
-- What changes with every job (state, host, epoch, the running definition) lives in a narrow
-- table of its own: a job rewrites a small row here, not the domain's XML above. When a
-- domain has a row here, it overrides the same columns of `domains`.
CREATE TABLE IF NOT EXISTS domain_state (
    uuid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    host_id TEXT,
    epoch INTEGER NOT NULL,
    live INTEGER NOT NULL,  -- 0: not running; 1: started from `domains.xml`; 2: from live_xml
    live_xml TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS jobs (
    job_id INTEGER PRIMARY KEY,
    uuid TEXT NOT NULL,
    domain_name TEXT NOT NULL,
    op TEXT NOT NULL,
    state TEXT NOT NULL,
    body BLOB NOT NULL  -- the job's other fields that differ from their defaults, a msgpack
                        -- map (every field, as JSON text or msgpack, in older stores)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- The last event_history events, for replay (`events` request): msgpack [kind, body].
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, body BLOB NOT NULL);
"""


log = logging.getLogger("virtbroker.store")


@dataclass
class Batch:
    """Rows to write in one transaction, copied out of the records when the batch was taken."""

    deleted: list[tuple] = field(default_factory=list)
    domains: list[tuple] = field(default_factory=list)
    states: list[tuple] = field(default_factory=list)
    jobs: list[tuple] = field(default_factory=list)
    deleted_jobs: list[tuple] = field(default_factory=list)
    meta: list[tuple] = field(default_factory=list)
    events: list[tuple] = field(default_factory=list)  # (seq, body)
    events_before: int | None = None  # delete every kept event with a lower seq


def _connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def write_batches(db: sqlite3.Connection, batches: list[Batch]) -> None:
    """Batches in the order they were taken, in one transaction: one commit, one fsync."""
    db.execute("BEGIN")
    try:
        for batch in batches:
            _apply(db, batch)
        db.execute("COMMIT")  # with synchronous=FULL in WAL mode: one fsync of the WAL
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _apply(db: sqlite3.Connection, batch: Batch) -> None:
    # Deletes first: an undefine and a define of the same name in one batch must not
    # trip the UNIQUE(name) constraint. A rename cannot happen (define refuses it), so
    # an upsert by uuid is enough.
    _delete(db, "domains", "uuid", batch.deleted)
    _delete(db, "domain_state", "uuid", batch.deleted)
    _insert(
        db,
        "INSERT INTO domains (uuid, name, xml, state, host_id, epoch, generation, live_xml)",
        batch.domains,
        " ON CONFLICT(uuid) DO UPDATE SET name=excluded.name, xml=excluded.xml,"
        " state=excluded.state, host_id=excluded.host_id, epoch=excluded.epoch,"
        " generation=excluded.generation, live_xml=excluded.live_xml",
    )
    _insert(db, "INSERT OR REPLACE INTO domain_state (uuid, state, host_id, epoch, live, live_xml)", batch.states)
    _insert(db, "INSERT OR REPLACE INTO jobs (job_id, uuid, domain_name, op, state, body)", batch.jobs)
    _delete(db, "jobs", "job_id", batch.deleted_jobs)
    _insert(db, "INSERT OR REPLACE INTO meta (key, value)", batch.meta)
    _insert(db, "INSERT OR REPLACE INTO events (seq, body)", batch.events)
    if batch.events_before is not None:
        db.execute("DELETE FROM events WHERE seq < ?", (batch.events_before,))


# Rows go to SQLite ROWS_PER_STATEMENT at a time, in one multi-row statement, not through
# executemany: executemany steps the statement once per row, and the sqlite3 module lets
# go of the GIL and takes it back around every step. Under load the broker's loop thread
# holds the GIL, so the writer waited for it once per row (docs/ARCHITECTURE.md has the
# one-off measurement that showed it).
ROWS_PER_STATEMENT = 100  # 800 parameters at most (the domains table), far below SQLite's limit


def _insert(db: sqlite3.Connection, head: str, rows: list[tuple], tail: str = "") -> None:
    """`head VALUES (?, ...), (?, ...) tail` for every row, ROWS_PER_STATEMENT rows a statement."""
    if not rows:
        return
    one = "(" + ", ".join("?" * len(rows[0])) + ")"
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        chunk = rows[start : start + ROWS_PER_STATEMENT]
        db.execute(f"{head} VALUES {', '.join([one] * len(chunk))}{tail}", [v for row in chunk for v in row])


def _delete(db: sqlite3.Connection, table: str, key: str, rows: list[tuple]) -> None:
    """Delete the rows of `table` whose `key` is in `rows` (one-value tuples),
    ROWS_PER_STATEMENT keys a statement."""
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        chunk = rows[start : start + ROWS_PER_STATEMENT]
        db.execute(f"DELETE FROM {table} WHERE {key} IN ({', '.join('?' * len(chunk))})", [row[0] for row in chunk])


def _state_row(r: DomainRecord) -> tuple:
    if r.live_xml is None:
        live, live_xml = 0, None
    elif r.live_xml is r.xml or r.live_xml == r.xml:
        live, live_xml = 1, None  # the usual case: no second copy of the definition
    else:
        live, live_xml = 2, r.live_xml  # redefined while running
    return (r.uuid, r.state, r.host_id, r.epoch, live, live_xml)


def domain_record(domain_row: tuple, state_row: tuple | None) -> DomainRecord:
    """A stored domain: its `domains` row, whose state columns its `domain_state` row (if it
    has one) overrides. Every backend builds records here, so they agree on the rule."""
    if state_row is None:
        return DomainRecord(*domain_row)
    uuid, name, xml, _, _, _, generation, _ = domain_row
    _, state, host_id, epoch, live, live_xml = state_row
    running_xml = {1: xml, 2: live_xml}.get(live)  # live 0: not running
    return DomainRecord(uuid, name, xml, state, host_id, epoch, generation, running_xml)


_JOB_COLUMNS = frozenset({"job_id", "uuid", "domain_name", "op", "state"})


def _job_body(job: Job) -> bytes:
    """What a job's row holds besides its columns: the fields that are set (not None; a
    field left out loads as its default, which is None for all of them but submitted_at).
    A job's row is rewritten at each of its transitions, and a narrow row keeps more jobs
    on each page the commit writes."""
    return p.pack({k: v for k, v in job.__dict__.items() if v is not None and k not in _JOB_COLUMNS})


def _job_fields(row: tuple) -> dict:
    """A stored job: its columns over its body. The body is msgpack (bytes), or JSON (text)
    as stores before msgpack wrote it; older bodies carry every field, columns too."""
    job_id, uuid, domain_name, op, state, body = row
    fields = json.loads(body) if isinstance(body, str) else msgpack.unpackb(body, raw=False)
    fields.update(job_id=job_id, uuid=uuid, domain_name=domain_name, op=op, state=state)
    return fields


class Store:
    """Handlers mark records dirty; take_batch() copies them into one Batch to write.

    What a batch holds is on disk before any reply that depends on it is sent: the
    broker hands batches to a StoreWriter thread and releases the replies of each batch
    when its commit returns (group commit: one fsync covers every message of a loop turn).
    """

    def __init__(self, state_dir: str):
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, "broker.sqlite3")
        self.db = _connect(self.path)
        self.db.executescript(SCHEMA)
        self._clear()

    def _clear(self) -> None:
        """Nothing marked yet."""
        self.dirty_domains: dict[str, DomainRecord] = {}  # whole rows: definitions changed
        self.dirty_states: dict[str, DomainRecord] = {}  # state rows only
        self.deleted_domains: set[str] = set()
        self.dirty_jobs: dict[int, Job] = {}
        self.deleted_jobs: set[int] = set()
        self.dirty_meta: dict[str, str] = {}
        self.new_events: list[tuple[int, bytes]] = []
        self.events_before: int | None = None

    # -- reading at startup
    def load_domains(self) -> list[DomainRecord]:
        rows = self.db.execute(
            "SELECT d.uuid, d.name, d.xml, d.state, d.host_id, d.epoch, d.generation, d.live_xml,"
            " s.uuid, s.state, s.host_id, s.epoch, s.live, s.live_xml"
            " FROM domains d LEFT JOIN domain_state s ON s.uuid = d.uuid"
        ).fetchall()
        return [domain_record(row[:8], row[8:] if row[8] is not None else None) for row in rows]

    def load_jobs(self) -> list[Job]:
        rows = self.db.execute("SELECT job_id, uuid, domain_name, op, state, body FROM jobs ORDER BY job_id")
        return [Job.from_dict(_job_fields(row)) for row in rows]

    def events_since(self, since: int, limit: int) -> list[tuple[int, bytes]]:
        """Kept events with seq > since, oldest first (what is committed; later ones follow live)."""
        return self.db.execute(
            "SELECT seq, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (since, limit)
        ).fetchall()

    def oldest_event(self) -> int | None:
        row = self.db.execute("SELECT MIN(seq) FROM events").fetchone()
        return row[0] if row else None

    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    # -- marking
    def put_domain(self, record: DomainRecord) -> None:
        """The whole record: after a define."""
        self.deleted_domains.discard(record.uuid)
        self.dirty_domains[record.uuid] = record

    def put_domain_state(self, record: DomainRecord) -> None:
        """Only state, host, epoch and the running definition: what jobs change."""
        self.dirty_states[record.uuid] = record

    def delete_domain(self, uuid: str) -> None:
        self.dirty_domains.pop(uuid, None)
        self.dirty_states.pop(uuid, None)
        self.deleted_domains.add(uuid)

    def put_job(self, job: Job) -> None:
        self.dirty_jobs[job.job_id] = job

    def delete_job(self, job_id: int) -> None:
        """A job the broker forgot (see Scheduler.prune): its row goes with the next batch."""
        self.dirty_jobs.pop(job_id, None)
        self.deleted_jobs.add(job_id)

    def set_meta(self, key: str, value: str) -> None:
        self.dirty_meta[key] = value

    def put_event(self, seq: int, body: bytes) -> None:
        self.new_events.append((seq, body))

    def forget_events_before(self, seq: int) -> None:
        """Drop kept events older than seq with the next batch (the history is bounded)."""
        self.events_before = seq

    @property
    def pending(self) -> bool:
        return bool(
            self.dirty_domains or self.dirty_states or self.deleted_domains or self.dirty_jobs or self.deleted_jobs
            or self.dirty_meta or self.new_events or self.events_before is not None
        )

    def take_batch(self) -> Batch | None:
        """Copy the dirty rows out (records keep changing after this) and start afresh."""
        if not self.pending:
            return None
        batch = Batch(
            deleted=[(u,) for u in self.deleted_domains],
            domains=[
                (r.uuid, r.name, r.xml, r.state, r.host_id, r.epoch, r.generation, r.live_xml)
                for r in self.dirty_domains.values()
            ],
            # A whole-row write rewrites the state row too, so the two never disagree.
            states=[_state_row(r) for r in (self.dirty_states | self.dirty_domains).values()],
            jobs=[
                (j.job_id, j.uuid, j.domain_name, j.op, j.state, _job_body(j))
                for j in self.dirty_jobs.values()
            ],
            deleted_jobs=[(j,) for j in self.deleted_jobs],
            meta=list(self.dirty_meta.items()),
            events=self.new_events,
            events_before=self.events_before,
        )
        self.new_events = []
        self.events_before = None
        self.dirty_domains.clear()
        self.dirty_states.clear()
        self.deleted_domains.clear()
        self.dirty_jobs.clear()
        self.deleted_jobs.clear()
        self.dirty_meta.clear()
        return batch

    def open_writer(self) -> StoreWriterConnection:
        """The writer's own connection (made in the writer's thread)."""
        return SqliteWriter(self.path)

    def commit(self) -> None:
        """Write what is dirty now, in this thread (startup, shutdown, tests)."""
        batch = self.take_batch()
        if batch is not None:
            write_batches(self.db, [batch])

    def close(self) -> None:
        self.db.close()


class StoreWriterConnection(Protocol):
    """What the store writer thread writes through: its own connection to the store."""

    def write(self, batches: list[Batch]) -> int | None: ...

    def close(self) -> None: ...


class SqliteWriter:
    def __init__(self, path: str):
        self.db = _connect(path)

    def write(self, batches: list[Batch]) -> int | None:
        """Write and commit; None: SQLite has no revision to report."""
        write_batches(self.db, batches)
        return None

    def close(self) -> None:
        self.db.close()


class StoreWriter:
    """A thread that writes batches in order, so the broker loop serves reads during fsync.

    The loop submits (batch_id, Batch); the writer commits what has queued up, in one
    transaction, and sends the last id back on an inproc PUSH socket the loop polls (the
    loop releases the replies of every batch up to that id). A write that fails (disk full, I/O error) is
    fatal: the loop is told, and must exit without acknowledging anything more.
    """

    _instances = itertools.count(1)

    def __init__(self, store: Store, context: zmq.Context):
        self.store = store
        self.path = store.path
        self.context = context
        self.last_revision: int | None = None  # etcd: the revision of the last write
        # A broker that leads again after losing the lead makes a new writer in the same context.
        self.DONE_URL = f"inproc://store-writer-{next(self._instances)}"
        self.queue: queue.Queue = queue.Queue()
        self.done = context.socket(zmq.PULL)
        self.done.setsockopt(zmq.LINGER, 0)
        self.done.bind(self.DONE_URL)
        self.thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self.thread.start()

    def submit(self, batch_id: int, batch: Batch) -> None:
        self.queue.put((batch_id, batch))

    def _run(self) -> None:
        writer = self.store.open_writer()
        out = self.context.socket(zmq.PUSH)
        out.setsockopt(zmq.LINGER, 0)
        out.connect(self.DONE_URL)
        try:
            stopping = False
            while not stopping:
                # Everything submitted while the last commit ran goes into the next one:
                # under load a commit covers many loop turns, and the disk sees one fsync.
                items = [self.queue.get()]
                while items[-1] is not None:
                    try:
                        items.append(self.queue.get_nowait())
                    except queue.Empty:
                        break
                if items[-1] is None:
                    stopping = True
                    items.pop()
                if not items:
                    continue
                try:
                    self.last_revision = writer.write([batch for _, batch in items])
                except Exception as e:
                    code = getattr(e, "code", "store")
                    log.critical("cannot write the broker's state to %s (%s): %s", self.path, code, e)
                    out.send_multipart([b"error", f"{code}: {e}".encode()])
                    return
                out.send_multipart([b"done", str(items[-1][0]).encode()])
        finally:
            out.close(linger=0)
            writer.close()

    def stop(self) -> None:
        """Write what was submitted, then end the thread."""
        self.queue.put(None)
        self.thread.join()
        self.done.close(linger=0)

    def abandon(self) -> None:
        """Stop without waiting: what is in flight may or may not be written (a broker that
        lost the lead; its writes are fenced, and it acknowledges none of them). The thread
        ends on its own; `done` stays open for it until close()."""
        self.queue.put(None)

    def close(self, timeout_s: float) -> None:
        """After abandon(): wait for the thread (at most timeout_s), then close `done`."""
        self.thread.join(timeout_s)
        self.done.close(linger=0)
