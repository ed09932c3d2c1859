"""broker.sqlite3: what a batch writes is what the next broker loads, whichever rows it touched."""

import dataclasses
import json
import os
import sqlite3

import msgpack

from virtbroker.broker.registry import DomainRecord
from virtbroker.broker.scheduler import Job
from virtbroker.broker.store import _JOB_COLUMNS, Store

XML = "<domain type='test'><name>a</name></domain>"


def reopen(store: Store) -> dict[str, DomainRecord]:
    store.close()
    again = Store(os.path.dirname(store.path))
    try:
        return {r.uuid: r for r in again.load_domains()}
    finally:
        again.close()


def test_state_only_writes_leave_the_definition_and_are_loaded(tmp_path):
    store = Store(str(tmp_path))
    record = DomainRecord(uuid="u1", name="a", xml=XML)
    store.put_domain(record)
    store.commit()
    record.state, record.host_id, record.epoch, record.live_xml = "running", "h1", 3, record.xml
    store.put_domain_state(record)
    store.commit()
    with sqlite3.connect(store.path) as db:
        # The job's change went to the narrow table; the definition row was not rewritten.
        assert db.execute("SELECT state, epoch FROM domains").fetchall() == [("shutoff", 0)]
        assert db.execute("SELECT live, live_xml FROM domain_state").fetchall() == [(1, None)]
    loaded = reopen(store)["u1"]
    assert (loaded.state, loaded.host_id, loaded.epoch, loaded.live_xml, loaded.xml) == ("running", "h1", 3, XML, XML)


def test_a_guest_redefined_while_running_keeps_the_definition_it_started_from(tmp_path):
    store = Store(str(tmp_path))
    record = DomainRecord(uuid="u1", name="a", xml=XML, state="running", host_id="h1", epoch=1, live_xml=XML)
    store.put_domain(record)
    store.commit()
    record.xml = XML.replace("<name>", "<memory>1024</memory><name>")
    record.generation += 1
    store.put_domain(record)
    store.commit()
    loaded = reopen(store)["u1"]
    assert loaded.live_xml == XML and loaded.xml == record.xml and loaded.generation == 2


def test_shut_off_clears_the_running_definition_and_undefine_removes_both_rows(tmp_path):
    store = Store(str(tmp_path))
    a = DomainRecord(uuid="u1", name="a", xml=XML, state="running", host_id="h1", live_xml=XML)
    b = DomainRecord(uuid="u2", name="b", xml=XML)
    store.put_domain(a)
    store.put_domain(b)
    store.commit()
    a.state, a.host_id, a.live_xml = "shutoff", None, None
    store.put_domain_state(a)
    store.delete_domain("u2")
    store.commit()
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT uuid FROM domain_state").fetchall() == [("u1",)]
    loaded = reopen(store)
    assert list(loaded) == ["u1"] and loaded["u1"].live_xml is None and loaded["u1"].state == "shutoff"


def test_a_store_written_before_the_state_table_and_msgpack_bodies_still_loads(tmp_path):
    store = Store(str(tmp_path))
    store.close()
    job = Job(job_id=7, uuid="u1", domain_name="a", op="start", state="succeeded")
    with sqlite3.connect(tmp_path / "broker.sqlite3") as db:
        db.execute("DELETE FROM domain_state")
        db.execute(
            "INSERT INTO domains VALUES ('u1', 'a', ?, 'running', 'h1', 4, 1, ?)", (XML, XML)
        )
        db.execute("INSERT INTO jobs VALUES (7, 'u1', 'a', 'start', 'succeeded', ?)", (json.dumps(job.__dict__),))
        db.execute(
            "INSERT INTO jobs VALUES (8, 'u1', 'a', 'destroy', 'queued', ?)",
            (msgpack.packb(Job(job_id=8, uuid="u1", domain_name="a", op="destroy").__dict__),),
        )
    again = Store(str(tmp_path))
    try:
        (record,) = again.load_domains()
        assert (record.state, record.host_id, record.epoch, record.live_xml) == ("running", "h1", 4, XML)
        assert [j.__dict__ for j in again.load_jobs()] == [
            job.__dict__, Job(job_id=8, uuid="u1", domain_name="a", op="destroy").__dict__
        ]
    finally:
        again.close()


def test_batches_larger_than_one_statement_write_every_row(tmp_path):
    """Rows go to SQLite in multi-row statements of ROWS_PER_STATEMENT: a batch of several
    statements and a remainder, with deletes and upserts in the same batches."""
    from virtbroker.broker.store import ROWS_PER_STATEMENT

    n = ROWS_PER_STATEMENT * 2 + 37
    store = Store(str(tmp_path))
    records = [DomainRecord(uuid=f"u{i}", name=f"d{i}", xml=XML.replace("<name>a", f"<name>d{i}")) for i in range(n)]
    for record in records:
        store.put_domain(record)
    for i in range(n):
        store.put_job(Job(job_id=i + 1, uuid=f"u{i}", domain_name=f"d{i}", op="start", state="queued"))
    store.commit()
    for record in records[::2]:  # every other guest runs: a state row each
        record.state, record.host_id, record.epoch = "running", "h1", 1
        store.put_domain_state(record)
    for record in records[1::3]:  # a third is undefined, with its job
        store.delete_domain(record.uuid)
        store.delete_job(int(record.uuid[1:]) + 1)
    record = records[0]
    record.xml = XML.replace("<name>a", "<memory>1</memory><name>d0")  # an upsert of an existing row
    record.generation += 1
    store.put_domain(record)
    store.commit()
    gone = {r.uuid for r in records[1::3]}
    again = Store(str(tmp_path))
    try:
        loaded = {r.uuid: r for r in again.load_domains()}
        jobs = {j.job_id for j in again.load_jobs()}
    finally:
        again.close()
        store.close()
    assert set(loaded) == {r.uuid for r in records} - gone
    for i, r in enumerate(records):
        if r.uuid in loaded:
            assert (loaded[r.uuid].state, loaded[r.uuid].epoch) == (("running", 1) if i % 2 == 0 else ("shutoff", 0))
    assert loaded["u0"].xml == record.xml and loaded["u0"].generation == 2
    assert jobs == {int(u[1:]) + 1 for u in {r.uuid for r in records} - gone}


def test_job_rows_carry_only_the_fields_that_are_set_and_load_whole(tmp_path):
    store = Store(str(tmp_path))
    plain = Job(job_id=1, uuid="u1", domain_name="a", op="start")
    full = Job(job_id=2, uuid="u2", domain_name="b", op="shutdown", state="failed", submitted_at=1.5,
               started_at=2.5, finished_at=3.5, error="boom", error_code="driver", timeout_s=60.0,
               idempotency_key="k", worker_id="w1", host_id="h1", lease_id="l1", epoch=4)
    store.put_job(plain)
    store.put_job(full)
    store.commit()
    with sqlite3.connect(store.path) as db:
        bodies = [msgpack.unpackb(b) for (b,) in db.execute("SELECT body FROM jobs ORDER BY job_id")]
    assert bodies[0] == {"submitted_at": 0.0}  # a queued job at its defaults: the columns say the rest
    assert "uuid" not in bodies[1] and bodies[1]["error"] == "boom"
    store.close()
    again = Store(str(tmp_path))
    try:
        assert [j.__dict__ for j in again.load_jobs()] == [plain.__dict__, full.__dict__]
    finally:
        again.close()


def test_job_fields_left_out_of_a_row_default_to_none():
    """A row leaves out the fields that are None, and loading fills them from the defaults:
    a field whose default is not None would come back changed."""
    others = [f for f in dataclasses.fields(Job) if f.name not in _JOB_COLUMNS and f.name != "submitted_at"]
    assert others and {f.default for f in others} == {None}
