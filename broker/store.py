"""Durable broker state in SQLite (WAL, fsync on commit), written as one group commit per loop batch."""

from __future__ import annotations

import json
import os
import sqlite3

from broker.registry import DomainRecord
from broker.scheduler import Job

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
CREATE TABLE IF NOT EXISTS jobs (
    job_id INTEGER PRIMARY KEY,
    uuid TEXT NOT NULL,
    domain_name TEXT NOT NULL,
    op TEXT NOT NULL,
    state TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class Store:
    """Handlers mark records dirty; commit() writes them all in one transaction and syncs.

    The broker replies only after commit() returns, so an acknowledged define, undefine,
    submission or state change is on disk before anyone hears of it (group commit: one
    fsync covers every message handled in the batch).
    """

    def __init__(self, state_dir: str):
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, "broker.sqlite3")
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self.dirty_domains: dict[str, DomainRecord] = {}
        self.deleted_domains: set[str] = set()
        self.dirty_jobs: dict[int, Job] = {}
        self.dirty_meta: dict[str, str] = {}

    # -- reading at startup
    def load_domains(self) -> list[DomainRecord]:
        rows = self.db.execute(
            "SELECT uuid, name, xml, state, host_id, epoch, generation, live_xml FROM domains"
        ).fetchall()
        return [DomainRecord(*row) for row in rows]

    def load_jobs(self) -> list[Job]:
        rows = self.db.execute("SELECT body FROM jobs ORDER BY job_id").fetchall()
        return [Job.from_dict(json.loads(row[0])) for row in rows]

    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    # -- marking
    def put_domain(self, record: DomainRecord) -> None:
        self.deleted_domains.discard(record.uuid)
        self.dirty_domains[record.uuid] = record

    def delete_domain(self, uuid: str) -> None:
        self.dirty_domains.pop(uuid, None)
        self.deleted_domains.add(uuid)

    def put_job(self, job: Job) -> None:
        self.dirty_jobs[job.job_id] = job

    def set_meta(self, key: str, value: str) -> None:
        self.dirty_meta[key] = value

    @property
    def pending(self) -> bool:
        return bool(self.dirty_domains or self.deleted_domains or self.dirty_jobs or self.dirty_meta)

    def commit(self) -> None:
        if not self.pending:
            return
        db = self.db
        db.execute("BEGIN")
        try:
            # Deletes first: an undefine and a define of the same name in one batch must not
            # trip the UNIQUE(name) constraint.
            db.executemany("DELETE FROM domains WHERE uuid = ?", [(u,) for u in self.deleted_domains])
            # A rename cannot happen (define refuses it), so upsert by uuid is enough.
            db.executemany(
                "INSERT INTO domains (uuid, name, xml, state, host_id, epoch, generation, live_xml)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(uuid) DO UPDATE SET name=excluded.name, xml=excluded.xml,"
                " state=excluded.state, host_id=excluded.host_id, epoch=excluded.epoch,"
                " generation=excluded.generation, live_xml=excluded.live_xml",
                [
                    (r.uuid, r.name, r.xml, r.state, r.host_id, r.epoch, r.generation, r.live_xml)
                    for r in self.dirty_domains.values()
                ],
            )
            db.executemany(
                "INSERT OR REPLACE INTO jobs (job_id, uuid, domain_name, op, state, body) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (j.job_id, j.uuid, j.domain_name, j.op, j.state, json.dumps(j.to_dict()))
                    for j in self.dirty_jobs.values()
                ],
            )
            db.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(self.dirty_meta.items())
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.dirty_domains.clear()
        self.deleted_domains.clear()
        self.dirty_jobs.clear()
        self.dirty_meta.clear()

    def close(self) -> None:
        self.db.close()
