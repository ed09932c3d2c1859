"""The etcd backend on a real three-member cluster: records as the SQLite store keeps them,
fenced writes, campaigns, a member killed, quorum lost, snapshot plus watch."""

from __future__ import annotations

import threading
import time

import pytest

from tests.waiting import wait_until
from virtbroker.broker.etcd_store import (
    MAX_TXN_OPS,
    FencedError,
    events_from,
    plan_transactions,
    records_from,
)
from virtbroker.broker.registry import DomainRecord
from virtbroker.broker.scheduler import Job
from virtbroker.broker.store import Batch, Store, write_batches
from virtbroker.common.errors import UnavailableError

XML = "<domain type='kvm'><name>{name}</name><memory>131072</memory></domain>"


def leader_value(name: str) -> bytes:
    return f'{{"broker": "{name}", "urls": ["tcp://127.0.0.1:5555"]}}'.encode()


def sample_batches(store: Store) -> list[Batch]:
    """Batches as the broker's Store takes them: every kind of row, and changes that a later
    batch overrides (a state after a define, a deleted domain and job)."""
    never_run = DomainRecord("u-1", "never-run", XML.format(name="never-run"))
    running = DomainRecord("u-2", "running", XML.format(name="running"), "running", "host-a", 4, 2)
    running.live_xml = running.xml  # live 1: started from the definition
    redefined = DomainRecord("u-3", "redefined", XML.format(name="redefined"), "paused", "host-b", 7, 3)
    redefined.live_xml = XML.format(name="redefined-old")  # live 2: redefined while running
    doomed = DomainRecord("u-4", "doomed", XML.format(name="doomed"))
    for record in (never_run, running, redefined, doomed):
        store.put_domain(record)
    store.put_job(Job(1, "u-2", "running", "start", "succeeded", submitted_at=1.5, started_at=2.0, finished_at=3.0,
                      worker_id="w1", host_id="host-a", lease_id="l-1", epoch=4))
    store.put_job(Job(2, "u-3", "redefined", "shutdown", "failed", submitted_at=4.0, error="guest ignored ACPI",
                      error_code="operation-failed", timeout_s=5.0, idempotency_key="k-2", deadline_s=30.0))
    store.put_job(Job(3, "u-4", "doomed", "start", "queued"))
    store.set_meta("next_job_id", "4")
    store.set_meta("event_seq", "9")
    first = store.take_batch()

    running.state, running.epoch = "shutoff", 5  # a state-only row over the whole row
    running.live_xml = None
    store.put_domain_state(running)
    store.delete_domain("u-4")
    store.delete_job(3)
    store.put_job(Job(4, "u-1", "never-run", "start", "running", submitted_at=9.0, worker_id="w2", host_id="host-a",
                      lease_id="l-4", epoch=1))
    store.set_meta("next_job_id", "5")
    second = store.take_batch()
    return [first, second]


def by_uuid(records: list[DomainRecord]) -> list[DomainRecord]:
    return sorted(records, key=lambda r: r.uuid)


def test_a_batch_round_trips_as_the_sqlite_store_keeps_it(tmp_path, etcd_backends):
    store = Store(str(tmp_path / "sqlite"))
    try:
        batches = sample_batches(store)
        write_batches(store.db, batches)
        backend = etcd_backends()
        leadership = backend.campaign(leader_value("a"), ttl_s=10)
        assert leadership is not None
        revision = backend.write_batches(batches, leadership.fence)
        assert revision > leadership.token

        assert by_uuid(backend.load_domains()) == by_uuid(store.load_domains())
        assert backend.load_jobs() == store.load_jobs()
        assert [j.job_id for j in backend.load_jobs()] == [1, 2, 4]
        for key in ("next_job_id", "event_seq", "absent"):
            assert backend.meta(key) == store.meta(key)
        assert backend.meta("absent", "dflt") == "dflt"

        # A standby's route: one snapshot, records built from the raw copy.
        raw, snap_revision = backend.snapshot()
        assert snap_revision == revision
        domains, jobs, meta = records_from(raw)
        assert by_uuid(domains) == by_uuid(store.load_domains())
        assert jobs == store.load_jobs()
        assert meta == {"next_job_id": "5", "event_seq": "9"}
    finally:
        store.close()


def test_kept_events_are_written_read_and_forgotten(etcd_backends):
    backend = etcd_backends()
    leadership = backend.campaign(leader_value("a"), ttl_s=10)
    first = Batch()
    first.events = [(seq, f"event {seq}".encode()) for seq in range(1, 13)]
    backend.write_batches([first], leadership.fence)
    assert backend.load_events(0) == first.events
    assert backend.load_events(10) == first.events[10:]
    assert backend.oldest_event() == 1

    # A later batch adds two and forgets the oldest: one by seq, the rest below a bound,
    # one of them written in the same batch (the bound wins, as in SQLite).
    second = Batch()
    second.events = [(5, b"rewritten"), (13, b"event 13"), (14, b"event 14")]
    second.deleted_events = [(12,)]
    second.events_before = 8
    backend.write_batches([second], leadership.fence)
    expected = [(s, f"event {s}".encode()) for s in (8, 9, 10, 11, 13, 14)]
    assert backend.load_events(0) == expected
    assert backend.oldest_event() == 8
    assert events_from(backend.snapshot()[0], 10) == expected[3:]


def test_a_batch_over_etcds_limits_is_split_and_lands_whole_in_order(etcd_backends):
    backend = etcd_backends()
    leadership = backend.campaign(leader_value("a"), ttl_s=10)
    batch = Batch(
        domains=[(f"u-{i:03d}", f"d-{i:03d}", XML.format(name=f"d-{i:03d}"), "shutoff", None, 0, 1, None) for i in range(40)],
        jobs=[(job_id, "u-000", "d-000", "start", "succeeded", b"\x80") for job_id in range(1, 301)],
        meta=[("next_job_id", "301")],
    )
    txns = plan_transactions(backend.prefix, [batch])
    assert [len(ops) for ops in txns] == [128, 128, 85]  # 341 ops
    assert all(len(ops) <= MAX_TXN_OPS for ops in txns)

    _, start_revision = backend.snapshot()
    watch = backend.watch(start_revision + 1)
    try:
        revision = backend.write_batches([batch], leadership.fence)
        changes = []
        wait_until(lambda: changes.extend(watch.get(0.5)) or (changes and changes[-1].revision >= revision),
                   timeout_s=10, what="every change watched")
    finally:
        watch.close()
    # Three transactions, one after the other, each with its share of the ops in order.
    assert sorted({c.revision for c in changes}) == [start_revision + 1, start_revision + 2, start_revision + 3]
    assert revision == start_revision + 3
    assert [c.revision for c in changes] == sorted(c.revision for c in changes)
    assert len(changes) == 341
    assert [j.job_id for j in backend.load_jobs()] == list(range(1, 301))
    assert len(backend.load_domains()) == 40
    assert backend.meta("next_job_id") == "301"


def test_a_batch_over_the_request_size_is_split_by_bytes(etcd_backends):
    backend = etcd_backends()
    leadership = backend.campaign(leader_value("a"), ttl_s=10)
    big = "x" * 600_000
    batch = Batch(domains=[(f"u-{i}", f"d-{i}", big, "shutoff", None, 0, 1, None) for i in range(3)])
    assert [len(ops) for ops in plan_transactions(backend.prefix, [batch])] == [2, 1]
    backend.write_batches([batch], leadership.fence)
    assert sorted(r.name for r in backend.load_domains()) == ["d-0", "d-1", "d-2"]


def test_a_write_under_a_stale_fence_is_refused_and_writes_nothing(etcd_backends):
    first, second = etcd_backends(), etcd_backends()
    old = first.campaign(leader_value("first"), ttl_s=10)
    first.write_batches([Batch(meta=[("owner", "first")])], old.fence)
    old.resign()
    new = second.campaign(leader_value("second"), ttl_s=10)
    assert new is not None and new.token > old.token

    _, before = first.snapshot()
    stale = Batch(meta=[("owner", "stale")], jobs=[(1, "u", "d", "start", "queued", b"\x80")])
    with pytest.raises(FencedError) as refused:
        first.write_batches([stale], old.fence)
    assert refused.value.code == "fenced"
    _, after = first.snapshot()
    assert after == before  # not one key changed
    assert first.meta("owner") == "first" and first.load_jobs() == []


def test_campaign_one_wins_and_the_other_takes_over_when_its_lease_expires(etcd_backends):
    backends = [etcd_backends(), etcd_backends()]
    results: list = [None, None]
    ready = threading.Barrier(2)

    def campaign(i: int) -> None:
        ready.wait(5)
        results[i] = backends[i].campaign(leader_value(f"b{i}"), ttl_s=2)

    threads = [threading.Thread(target=campaign, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sum(r is not None for r in results) == 1
    winner_i = 0 if results[0] is not None else 1
    winner, loser = backends[winner_i], backends[1 - winner_i]
    won = results[winner_i]
    assert loser.leader() == (leader_value(f"b{winner_i}"), won.token)
    assert won.keepalive()
    assert loser.campaign(leader_value("again"), ttl_s=2) is None

    # The winner stops its keepalives; its lease expires and the key goes with it.
    assert loser.wait_for_leader_change(won.token, timeout_s=15)
    assert loser.leader() is None
    taken = loser.campaign(leader_value(f"b{1 - winner_i}"), ttl_s=2)
    assert taken is not None and taken.token > won.token
    assert not won.keepalive()
    with pytest.raises(FencedError):
        winner.write_batches([Batch(meta=[("owner", "old")])], won.fence)
    loser.write_batches([Batch(meta=[("owner", "new")])], taken.fence)
    assert winner.meta("owner") == "new"
    # A standby watching the new leader's key: it stands while kept alive.
    assert taken.keepalive()
    assert not winner.wait_for_leader_change(taken.token, timeout_s=0.5)
    taken.resign()
    assert winner.wait_for_leader_change(taken.token, timeout_s=5)


def test_writes_go_on_after_the_etcd_leader_is_killed_and_none_acknowledged_is_lost(etcd_cluster, etcd_backends):
    backend = etcd_backends(request_timeout_s=2.0)
    leadership = backend.campaign(leader_value("a"), ttl_s=30)
    acked: list[int] = []
    unavailable: list[float] = []
    stop = threading.Event()

    def writer() -> None:
        job_id = 0
        while not stop.is_set():
            job_id += 1
            batch = Batch(jobs=[(job_id, "u", "d", "start", "queued", b"\x80")], meta=[("last", str(job_id))])
            while not stop.is_set():
                started = time.monotonic()
                try:
                    backend.write_batches([batch], leadership.fence)
                except UnavailableError:
                    unavailable.append(time.monotonic() - started)
                    continue  # the same batch again: its outcome is unknown
                acked.append(job_id)
                break

    thread = threading.Thread(target=writer, name="etcd-test-writer")
    thread.start()
    try:
        wait_until(lambda: len(acked) >= 20, timeout_s=20, what="20 writes acknowledged")
        victim = etcd_cluster.leader_index()
        assert victim is not None
        etcd_cluster.kill9(victim)
        at_kill = len(acked)
        wait_until(lambda: len(acked) >= at_kill + 50, timeout_s=30, what="writes resumed on the other members")
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert all(elapsed < 2.0 + 1.0 for elapsed in unavailable)

    reader = etcd_backends()
    stored = {job.job_id for job in reader.load_jobs()}
    assert set(acked) <= stored
    assert acked == list(range(1, len(acked) + 1))  # in order, none skipped
    etcd_cluster.start(victim)  # it rejoins and catches up
    assert etcd_cluster.healthy(victim)


def test_without_quorum_a_write_fails_within_its_timeout_and_succeeds_after_restart(etcd_cluster, etcd_backends):
    backend = etcd_backends(request_timeout_s=2.0)
    leadership = backend.campaign(leader_value("a"), ttl_s=60)
    backend.write_batches([Batch(meta=[("n", "1")])], leadership.fence)
    etcd_cluster.stop(0)
    etcd_cluster.stop(1)

    for attempt in range(3):  # whichever member the backend tries first
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            backend.write_batches([Batch(meta=[("n", str(2 + attempt))])], leadership.fence)
        assert time.monotonic() - started < 2.0 + 1.0

    etcd_cluster.start(0, wait=False)  # healthy needs a quorum: wait on the second
    etcd_cluster.start(1)
    etcd_cluster.wait_healthy(0)
    backend.write_batches([Batch(meta=[("n", "9")])], leadership.fence)
    assert backend.meta("n") == "9"


def test_a_standby_keeps_a_current_copy_with_snapshot_and_watch(etcd_cluster, etcd_backends):
    leader_backend, standby = etcd_backends(request_timeout_s=5.0), etcd_backends()
    leadership = leader_backend.campaign(leader_value("a"), ttl_s=30)
    store_rows = Batch(
        domains=[(f"u-{i}", f"d-{i}", XML.format(name=f"d-{i}"), "shutoff", None, 0, 1, None) for i in range(5)],
        meta=[("next_job_id", "1")],
    )
    leader_backend.write_batches([store_rows], leadership.fence)

    raw, revision = standby.snapshot()
    watch = standby.watch(revision + 1)
    try:
        revisions = []
        for n in range(1, 31):
            batch = Batch(
                states=[(f"u-{n % 5}", "running", "host-a", n, 1, None)],
                jobs=[(n, f"u-{n % 5}", f"d-{n % 5}", "start", "succeeded", b"\x80")],
                deleted_jobs=[(n - 2,)] if n > 2 else [],
                meta=[("next_job_id", str(n + 1))],
            )
            if n == 20:
                batch.deleted = [("u-4",)]
            revisions.append(leader_backend.write_batches([batch], leadership.fence))
            if n == 15:
                # The member the watch reads from dies: it resumes at another from where it was.
                etcd_cluster.kill9(watch.http.current)
        seen = []

        def caught_up() -> bool:
            for change in watch.get(0.5):
                assert not seen or change.revision >= seen[-1]
                seen.append(change.revision)
                if change.deleted:
                    raw.pop(change.key, None)
                else:
                    raw[change.key] = change.value
            return bool(seen) and seen[-1] >= revisions[-1]

        wait_until(caught_up, timeout_s=20, what="the watch caught up")
    finally:
        watch.close()
    assert sorted(set(seen)) == revisions  # every write, each once, in order
    current, _ = standby.snapshot()
    assert raw == current
    domains, jobs, meta = records_from(raw)
    assert by_uuid(domains) == by_uuid(standby.load_domains())
    assert [j.job_id for j in jobs] == [29, 30]
    assert meta["next_job_id"] == "31"
