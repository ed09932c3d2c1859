"""Durable security-driver state in SQLite: the transaction journal, remembered owners, profiles."""

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

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
CREATE TABLE IF NOT EXISTS dac_refs (
    domain_uuid TEXT NOT NULL,
    path TEXT NOT NULL,
    dev INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    PRIMARY KEY (domain_uuid, path)
);
CREATE INDEX IF NOT EXISTS dac_refs_file ON dac_refs (dev, ino);
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


@dataclass(eq=False)
class _Change:
    apply: Callable[[sqlite3.Connection], Any]
    result: Any = None
    error: BaseException | None = None
    done: bool = False


class GroupCommit:
    """Many threads' small transactions, made durable together with one fsync.

    Each caller queues its change and takes the commit lock. Whoever holds it commits
    every change queued so far in one SQLite transaction, each in its own savepoint (so
    one failing change is undone alone), and marks them done. A caller whose change a
    previous holder already committed returns at once. While one batch fsyncs, the
    next one queues, so a batch holds every change that arrived during the fsync before.
    A thread that holds a lock around its change (`serialization = global`) is alone
    in its batch, which is exactly the serialization that mode asks for.
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection]):
        self._connect = connect
        self._conn: sqlite3.Connection | None = None
        self._queue: list[_Change] = []
        self._queue_mutex = threading.Lock()
        self._commit_lock = threading.Lock()
        self.batches = 0  # how many fsyncs; tests and benchmarks read it

    def run(self, apply: Callable[[sqlite3.Connection], T]) -> T:
        change = _Change(apply)
        with self._queue_mutex:
            self._queue.append(change)
        with self._commit_lock:
            if not change.done:
                with self._queue_mutex:
                    batch, self._queue = self._queue, []
                self._commit(batch)
        if change.error is not None:
            raise change.error
        return change.result

    def _commit(self, batch: list[_Change]) -> None:
        if self._conn is None:
            self._conn = self._connect()
        conn = self._conn
        try:
            # BEGIN IMMEDIATE takes SQLite's write lock up front, waiting for another
            # process's writer instead of failing later with SQLITE_BUSY.
            conn.execute("BEGIN IMMEDIATE")
            for change in batch:
                conn.execute("SAVEPOINT change")
                try:
                    change.result = change.apply(conn)
                except Exception as e:
                    conn.execute("ROLLBACK TO change")
                    change.error = e
                conn.execute("RELEASE change")
            conn.execute("COMMIT")
            self.batches += 1
        except BaseException as e:
            # The commit itself failed (disk full, I/O error): nothing in the batch is durable.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for change in batch:
                change.error = e
            if not isinstance(e, Exception):
                raise
        finally:
            for change in batch:
                change.done = True

    def close(self) -> None:
        with self._commit_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class SecurityStore:
    """SQLite in WAL mode with synchronous=FULL: a commit is on disk before the call returns.

    Any thread may use one store, and any process sharing state_dir; SQLite's own
    locking orders the writers of different processes. The writes of this process's
    threads are group-committed (GroupCommit): one fsync for every change that queued
    while the previous one was on its way to disk. Each thread reads on its own connection.
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
        self._writer = GroupCommit(self._open_writer)
        self._readers = threading.local()

    def _open_writer(self) -> sqlite3.Connection:
        # Used by whichever thread commits a batch, one at a time (GroupCommit's lock).
        conn = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def close(self) -> None:
        self._writer.close()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """This thread's read connection, opened on first use and kept: opening one costs
        more than most of the queries made on it."""
        conn = getattr(self._readers, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            self._readers.conn = conn
        yield conn

    def _write(self, change: Callable[[sqlite3.Connection], T]) -> T:
        """Run change(conn) in a transaction that is on disk when this returns."""
        return self._writer.run(change)

    # -- journal --

    def begin(self, driver: str, domain_uuid: str, op: str, paths: list[str]) -> int:
        """Record an intent durably, before any file is touched; returns its txn_id."""
        def change(conn: sqlite3.Connection):
            cur = conn.execute(
                "INSERT INTO journal (driver, domain_uuid, op, paths, phase, started_at_s) VALUES (?, ?, ?, ?, ?, ?)",
                (driver, domain_uuid, op, json.dumps(list(paths)), PHASE_PENDING, time.time()),
            )
            return int(cur.lastrowid)
        return self._write(change)

    def finish(self, txn_id: int, phase: str) -> None:
        def change(conn: sqlite3.Connection):
            self._finish(conn, txn_id, phase)
        self._write(change)

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
        def change(conn: sqlite3.Connection):
            cur = conn.execute(
                "DELETE FROM journal WHERE phase != ? AND finished_at_s < ?", (PHASE_PENDING, finished_before_s)
            )
            return cur.rowcount
        return self._write(change)

    # -- which domain holds which paths (DAC) --

    def commit_label(self, txn_id: int, driver: str, domain_uuid: str, paths: list[str]) -> None:
        """The domain now holds `paths`; the label transaction is committed (atomically)."""
        def change(conn: sqlite3.Connection):
            conn.executemany(
                "INSERT OR IGNORE INTO domain_paths (driver, domain_uuid, path) VALUES (?, ?, ?)",
                [(driver, domain_uuid, p) for p in paths],
            )
            self._finish(conn, txn_id, PHASE_COMMITTED)
        self._write(change)

    def commit_restore(self, txn_id: int, driver: str, domain_uuid: str, paths: list[str]) -> None:
        """The domain no longer holds `paths`; this restore and the domain's older unfinished
        transactions, whose paths it covered, are closed (atomically)."""
        def change(conn: sqlite3.Connection):
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
        self._write(change)

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

    # -- DAC references: which domain holds which file (the inode, not the name) --
    # A row is written before the file's owner record changes and deleted only after the
    # file was given back, so a crash in between leaves a row that recovery finishes. The
    # record's `refs` count is always recomputed from these rows, never incremented, so
    # repeating a step after a crash cannot count a domain twice.

    def add_ref(self, domain_uuid: str, path: str, dev: int, ino: int) -> tuple[int, int] | None:
        """Record that the domain holds the file (dev, ino) at path; returns None if it now
        does, or the (dev, ino) of the other file it already held at that path."""
        def change(conn: sqlite3.Connection):
            row = conn.execute(
                "SELECT dev, ino FROM dac_refs WHERE domain_uuid = ? AND path = ?", (domain_uuid, path)
            ).fetchone()
            if row is not None:
                return None if (row[0], row[1]) == (dev, ino) else (row[0], row[1])
            conn.execute(
                "INSERT INTO dac_refs (domain_uuid, path, dev, ino) VALUES (?, ?, ?, ?)", (domain_uuid, path, dev, ino)
            )
            return None
        return self._write(change)

    def get_ref(self, domain_uuid: str, path: str) -> tuple[int, int] | None:
        """The (dev, ino) of the file the domain holds at path, or None."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT dev, ino FROM dac_refs WHERE domain_uuid = ? AND path = ?", (domain_uuid, path)
            ).fetchone()
        return (row[0], row[1]) if row else None

    def count_refs(self, dev: int, ino: int) -> int:
        """How many domains hold the file (dev, ino), under whichever path."""
        with self._connect() as conn:
            row = conn.execute("SELECT COUNT(*) FROM dac_refs WHERE dev = ? AND ino = ?", (dev, ino)).fetchone()
        return int(row[0])

    def ref_paths(self, domain_uuid: str) -> list[str]:
        """Every path the domain holds a reference on, committed or not."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT path FROM dac_refs WHERE domain_uuid = ? ORDER BY path", (domain_uuid,)
            ).fetchall()
        return [r[0] for r in rows]

    def drop_ref(self, domain_uuid: str, path: str, forget_owner_of: tuple[int, int] | None = None) -> None:
        """The domain no longer holds the file at path. With forget_owner_of = (dev, ino), also
        forget the path's remembered owner if it is that file's and no domain holds it now."""
        def change(conn: sqlite3.Connection):
            conn.execute("DELETE FROM dac_refs WHERE domain_uuid = ? AND path = ?", (domain_uuid, path))
            if forget_owner_of is None:
                return
            held = conn.execute(
                "SELECT COUNT(*) FROM dac_refs WHERE dev = ? AND ino = ?", forget_owner_of
            ).fetchone()[0]
            row = conn.execute("SELECT record FROM owners WHERE path = ?", (path,)).fetchone()
            if held == 0 and row is not None:
                try:
                    record = json.loads(row[0])
                    names = (record.get("dev"), record.get("ino")) if isinstance(record, dict) else None
                except ValueError:
                    names = None
                if names == tuple(forget_owner_of):
                    conn.execute("DELETE FROM owners WHERE path = ?", (path,))
        self._write(change)

    # -- remembered owners, for filesystems without trusted.* xattrs --
    # Keyed by resolved path, but each record names its file (dev, ino): a record is
    # applied only to that inode, never to whatever file sits at the path later.

    def get_owner(self, path: str) -> str | None:
        """The record as stored (JSON text); the driver validates it."""
        with self._connect() as conn:
            r = conn.execute("SELECT record FROM owners WHERE path = ?", (path,)).fetchone()
        return r[0] if r else None

    def put_owner(self, path: str, record: dict) -> None:
        def change(conn: sqlite3.Connection):
            conn.execute(
                "INSERT OR REPLACE INTO owners (path, record) VALUES (?, ?)", (path, json.dumps(record, sort_keys=True))
            )
        self._write(change)

    def delete_owner(self, path: str) -> None:
        def change(conn: sqlite3.Connection):
            conn.execute("DELETE FROM owners WHERE path = ?", (path,))
        self._write(change)

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
        def change(conn: sqlite3.Connection):
            conn.execute(
                "INSERT OR REPLACE INTO profiles (domain_uuid, profile_name, profile_path, loaded) VALUES (?, ?, ?, ?)",
                (profile.domain_uuid, profile.profile_name, profile.profile_path, int(profile.loaded)),
            )
            self._finish(conn, txn_id, PHASE_COMMITTED)
        self._write(change)

    def commit_profile_removal(self, txn_id: int, domain_uuid: str) -> None:
        """The domain's profile is gone; this restore and its older unfinished transactions are closed."""
        def change(conn: sqlite3.Connection):
            conn.execute("DELETE FROM profiles WHERE domain_uuid = ?", (domain_uuid,))
            conn.execute(
                "UPDATE journal SET phase = CASE op WHEN 'label' THEN ? ELSE ? END, finished_at_s = ? "
                "WHERE driver = 'apparmor' AND domain_uuid = ? AND phase = ? AND txn_id < ?",
                (PHASE_ROLLED_BACK, PHASE_COMMITTED, time.time(), domain_uuid, PHASE_PENDING, txn_id),
            )
            self._finish(conn, txn_id, PHASE_COMMITTED)
        self._write(change)
