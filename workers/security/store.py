"""Durable security-driver state in SQLite: the transaction journal, remembered owners, profiles."""

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

PHASE_PENDING = "pending"
PHASE_COMMITTED = "committed"
PHASE_ROLLED_BACK = "rolled-back"

BUSY_TIMEOUT_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    txn_id INTEGER PRIMARY KEY AUTOINCREMENT,
    driver TEXT NOT NULL,
    domain_uuid TEXT NOT NULL,
    op TEXT NOT NULL,
    paths TEXT NOT NULL,
    phase TEXT NOT NULL,
    started_at_s REAL NOT NULL,
    finished_at_s REAL
);
CREATE INDEX IF NOT EXISTS journal_pending ON journal (driver, phase);
CREATE TABLE IF NOT EXISTS domain_paths (
    driver TEXT NOT NULL,
    domain_uuid TEXT NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (driver, domain_uuid, path)
);
CREATE TABLE IF NOT EXISTS owners (
    path TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS profiles (
    domain_uuid TEXT PRIMARY KEY,
    profile_name TEXT NOT NULL,
    profile_path TEXT NOT NULL,
    loaded INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class Txn:
    """One journal entry: a driver's label or restore of one domain's paths."""

    txn_id: int
    driver: str
    domain_uuid: str
    op: str
    paths: tuple[str, ...]
    phase: str


@dataclass(frozen=True)
class Profile:
    """An AppArmor profile virtbroker wrote (and loaded, when the kernel has AppArmor)."""

    domain_uuid: str
    profile_name: str
    profile_path: str
    loaded: bool


class SecurityStore:
    """SQLite in WAL mode with synchronous=FULL: a commit is on disk before the call returns.

    Every call opens its own connection, so any thread (and any process sharing
    state_dir) may use one store; SQLite's own locking orders the writers, each for
    the few milliseconds of one statement batch.
    """

    def __init__(self, state_dir: str | os.PathLike):
        self.state_dir = os.fspath(state_dir)
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self.db_path = os.path.join(self.state_dir, "security.sqlite3")
        conn = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            # WAL is a property of the database file: set once, kept by every connection.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
        finally:
            conn.close()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous=FULL")
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front: a deferred transaction that reads
        # first and writes later can fail with SQLITE_BUSY without waiting.
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # -- journal --

    def begin(self, driver: str, domain_uuid: str, op: str, paths: list[str]) -> int:
        """Record an intent durably, before any file is touched; returns its txn_id."""
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO journal (driver, domain_uuid, op, paths, phase, started_at_s) VALUES (?, ?, ?, ?, ?, ?)",
                (driver, domain_uuid, op, json.dumps(list(paths)), PHASE_PENDING, time.time()),
            )
            return int(cur.lastrowid)

    def finish(self, txn_id: int, phase: str) -> None:
        with self._write() as conn:
            self._finish(conn, txn_id, phase)

    @staticmethod
    def _finish(conn: sqlite3.Connection, txn_id: int, phase: str) -> None:
        conn.execute(
            "UPDATE journal SET phase = ?, finished_at_s = ? WHERE txn_id = ?",
            (phase, time.time(), txn_id),
        )

    def pending(self, driver: str, domain_uuid: str | None = None) -> list[Txn]:
        """Entries never finished, oldest first (a crash or a failed rollback left them)."""
        query = "SELECT txn_id, driver, domain_uuid, op, paths, phase FROM journal WHERE driver = ? AND phase = ?"
        args: tuple = (driver, PHASE_PENDING)
        if domain_uuid is not None:
            query += " AND domain_uuid = ?"
            args += (domain_uuid,)
        with self._connect() as conn:
            rows = conn.execute(query + " ORDER BY txn_id", args).fetchall()
        return [Txn(r[0], r[1], r[2], r[3], tuple(json.loads(r[4])), r[5]) for r in rows]

    def txn(self, txn_id: int) -> Txn | None:
        with self._connect() as conn:
            r = conn.execute(
                "SELECT txn_id, driver, domain_uuid, op, paths, phase FROM journal WHERE txn_id = ?", (txn_id,)
            ).fetchone()
        return Txn(r[0], r[1], r[2], r[3], tuple(json.loads(r[4])), r[5]) if r else None

    def prune(self, finished_before_s: float) -> int:
        """Drop finished entries older than a wall-clock time; the journal is not a history."""
        with self._write() as conn:
            cur = conn.execute(
                "DELETE FROM journal WHERE phase != ? AND finished_at_s < ?", (PHASE_PENDING, finished_before_s)
            )
            return cur.rowcount

    # -- which domain holds which paths (DAC) --

    def commit_label(self, txn_id: int, driver: str, domain_uuid: str, paths: list[str]) -> None:
        """The domain now holds `paths`; the label transaction is committed (atomically)."""
        with self._write() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO domain_paths (driver, domain_uuid, path) VALUES (?, ?, ?)",
                [(driver, domain_uuid, p) for p in paths],
            )
            self._finish(conn, txn_id, PHASE_COMMITTED)

    def commit_restore(self, txn_id: int, driver: str, domain_uuid: str, paths: list[str]) -> None:
        """The domain no longer holds `paths`; this restore and the domain's older unfinished
        transactions, whose paths it covered, are closed (atomically)."""
        with self._write() as conn:
            conn.executemany(
                "DELETE FROM domain_paths WHERE driver = ? AND domain_uuid = ? AND path = ?",
                [(driver, domain_uuid, p) for p in paths],
            )
            # An older label is now undone; an older restore is now done.
            conn.execute(
                "UPDATE journal SET phase = CASE op WHEN 'label' THEN ? ELSE ? END, finished_at_s = ? "
                "WHERE driver = ? AND domain_uuid = ? AND phase = ? AND txn_id < ?",
                (PHASE_ROLLED_BACK, PHASE_COMMITTED, time.time(), driver, domain_uuid, PHASE_PENDING, txn_id),
            )
            self._finish(conn, txn_id, PHASE_COMMITTED)

    def domain_paths(self, driver: str, domain_uuid: str) -> list[str]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT path FROM domain_paths WHERE driver = ? AND domain_uuid = ? ORDER BY path",
                (driver, domain_uuid),
            ).fetchall()
        return [r[0] for r in rows]

    def domains(self, driver: str) -> list[str]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT DISTINCT domain_uuid FROM domain_paths WHERE driver = ? ORDER BY domain_uuid", (driver,)
            ).fetchall()
        return [r[0] for r in rows]

    # -- remembered owners, for filesystems without trusted.* xattrs --
    # Keyed by resolved path: a file renamed while labelled loses its record here (an
    # xattr would have followed the inode), so restore() then leaves it to the guest.

    def get_owner(self, path: str) -> dict | None:
        with self._connect() as conn:
            r = conn.execute("SELECT record FROM owners WHERE path = ?", (path,)).fetchone()
        return json.loads(r[0]) if r else None

    def put_owner(self, path: str, record: dict) -> None:
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO owners (path, record) VALUES (?, ?)", (path, json.dumps(record)))

    def delete_owner(self, path: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM owners WHERE path = ?", (path,))

    # -- AppArmor profiles --

    def get_profile(self, domain_uuid: str) -> Profile | None:
        with self._connect() as conn:
            r = conn.execute(
                "SELECT domain_uuid, profile_name, profile_path, loaded FROM profiles WHERE domain_uuid = ?",
                (domain_uuid,),
            ).fetchone()
        return Profile(r[0], r[1], r[2], bool(r[3])) if r else None

    def profiles(self) -> list[Profile]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT domain_uuid, profile_name, profile_path, loaded FROM profiles ORDER BY domain_uuid"
            ).fetchall()
        return [Profile(r[0], r[1], r[2], bool(r[3])) for r in rows]

    def commit_profile(self, txn_id: int, profile: Profile) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO profiles (domain_uuid, profile_name, profile_path, loaded) VALUES (?, ?, ?, ?)",
                (profile.domain_uuid, profile.profile_name, profile.profile_path, int(profile.loaded)),
            )
            self._finish(conn, txn_id, PHASE_COMMITTED)

    def commit_profile_removal(self, txn_id: int, domain_uuid: str) -> None:
        """The domain's profile is gone; this restore and its older unfinished transactions are closed."""
        with self._write() as conn:
            conn.execute("DELETE FROM profiles WHERE domain_uuid = ?", (domain_uuid,))
            conn.execute(
                "UPDATE journal SET phase = CASE op WHEN 'label' THEN ? ELSE ? END, finished_at_s = ? "
                "WHERE driver = 'apparmor' AND domain_uuid = ? AND phase = ? AND txn_id < ?",
                (PHASE_ROLLED_BACK, PHASE_COMMITTED, time.time(), domain_uuid, PHASE_PENDING, txn_id),
            )
            self._finish(conn, txn_id, PHASE_COMMITTED)
