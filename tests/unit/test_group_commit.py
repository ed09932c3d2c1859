"""The security journal's group commit: one transaction and one fsync for what queued together."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from tests.waiting import wait_until
from virtbroker.workers.security.store import PHASE_PENDING, SecurityStore


def _queued(store: SecurityStore, count: int, timeout_s: float = 10.0) -> None:
    wait_until(lambda: len(store._writer._queue) >= count, timeout_s, interval_s=0.01, what="changes queued")


def _run_while_blocked(store: SecurityStore, calls: list) -> list:
    """Start every call in its own thread while the commit lock is held, so they all queue; then let go."""
    results: list = [None] * len(calls)

    def call(i, fn):
        try:
            results[i] = fn()
        except Exception as e:  # handed back to the test
            results[i] = e

    store._writer._commit_lock.acquire()
    threads = [threading.Thread(target=call, args=(i, fn)) for i, fn in enumerate(calls)]
    try:
        for t in threads:
            t.start()
        _queued(store, len(calls))
    finally:
        store._writer._commit_lock.release()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    return results


def test_changes_queued_together_commit_in_one_batch_and_are_durable(tmp_path):
    store = SecurityStore(tmp_path)
    before = store._writer.batches
    calls = [lambda i=i: store.begin("dac", f"00000000-0000-4000-8000-{i:012d}", "label", [f"/x/{i}"]) for i in range(8)]
    txn_ids = _run_while_blocked(store, calls)
    assert store._writer.batches - before == 1
    assert sorted(txn_ids) == sorted(set(txn_ids)) and all(isinstance(t, int) for t in txn_ids)
    # Visible to a connection that shares nothing with the store: on disk, not in a cache.
    with sqlite3.connect(store.db_path) as other:
        rows = other.execute("SELECT txn_id, phase FROM journal ORDER BY txn_id").fetchall()
    assert [r[0] for r in rows] == sorted(txn_ids) and {r[1] for r in rows} == {PHASE_PENDING}
    store.close()


def test_a_failing_change_fails_alone(tmp_path):
    store = SecurityStore(tmp_path)

    def bad(conn):
        conn.execute("INSERT INTO journal (driver) VALUES ('half a row')")  # NOT NULL columns missing

    calls = [
        lambda: store.begin("dac", "00000000-0000-4000-8000-000000000001", "label", ["/x/1"]),
        lambda: store._write(bad),
        lambda: store.begin("dac", "00000000-0000-4000-8000-000000000002", "label", ["/x/2"]),
    ]
    first, failed, third = _run_while_blocked(store, calls)
    assert isinstance(failed, sqlite3.IntegrityError)
    assert isinstance(first, int) and isinstance(third, int)
    assert [t.txn_id for t in store.pending("dac")] == sorted([first, third])
    store.close()


def test_a_change_after_a_batch_is_committed_by_its_own_caller(tmp_path):
    store = SecurityStore(tmp_path)
    txn_id = store.begin("dac", "00000000-0000-4000-8000-000000000003", "label", ["/x/3"])
    store.finish(txn_id, "committed")
    assert store.txn(txn_id).phase == "committed"
    with pytest.raises(sqlite3.OperationalError):
        store._write(lambda conn: conn.execute("SELECT * FROM no_such_table"))
    # The failed change left the writer usable.
    assert store.begin("dac", "00000000-0000-4000-8000-000000000004", "label", ["/x/4"]) > txn_id
    store.close()
