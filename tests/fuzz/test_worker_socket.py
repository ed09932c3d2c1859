"""Random frames and bodies on the broker's worker socket: bad hellos, results for unknown jobs, junk.

The worker socket never answers errors (a worker cannot act on them); a bad message is
logged and dropped. Properties: whatever the broker sends back decodes as a worker
message, no domain is added or removed, the broker answers `list --all` within the probe
deadline after each batch, and its log shows no unexpected exception (checked when the
module's broker is torn down).
"""

from __future__ import annotations

import uuid as uuidlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.conftest import FUZZ
from tests.fuzz.strategies import body_for, frames_for, ints, packed, texts, values
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.common import protocol as p

WORKER_KINDS = sorted(kind for (version, kind) in p.kinds() if version == p.WORKER_VERSION)
WORKER_IDS = ["fw-1", "fw-2", "", "broker", "w" * 300]
EXISTING_UUID = "f0000000-0000-4000-8000-000000000001"


def _guest():
    return st.fixed_dictionaries(
        {},
        optional={
            "uuid": st.one_of(st.sampled_from([EXISTING_UUID, "not-a-uuid", ""]), texts, values),
            "name": texts,
            "state": st.one_of(st.sampled_from(["running", "paused", "shutoff", "x"]), values),
        },
    )


OVERRIDES = {
    "worker_id": st.one_of(st.sampled_from(WORKER_IDS), texts),
    "role": st.one_of(st.sampled_from(["lifecycle", "security", "client", ""]), texts),
    "slots": st.one_of(st.integers(-2, 3), ints),
    "host_id": st.one_of(st.sampled_from(["fuzzhost", ""]), texts),
    "job_id": st.one_of(st.integers(0, 4), ints),
    "lease_id": st.one_of(st.just(""), texts),
    "epoch": st.one_of(st.integers(-1, 3), ints),
    "drivers": st.lists(st.one_of(st.sampled_from(["dac", "apparmor"]), texts), max_size=3),
    "guests": st.lists(_guest(), max_size=3),
    "leases": st.lists(st.fixed_dictionaries({}, optional={"lease_id": values, "job_id": values, "epoch": values}),
                       max_size=3),
    "domain_state": st.one_of(st.none(), st.sampled_from(["running", "paused", "shutoff", "x"])),
    "label_id": texts,
    "action": st.one_of(st.sampled_from(["label", "restore", "x"]), texts),
    "driver": st.one_of(st.sampled_from(["dac", "apparmor", ""]), texts),
}


@pytest.fixture(scope="module")
def broker(fuzz_broker):
    c = fuzz_broker.probe_client
    c.define(minimal_domain_xml("fzw-a", uuid=EXISTING_UUID))
    c.define(minimal_domain_xml("fzw-b"))
    c.submit("fzw-a", "start")  # job 1, queued: a fake lifecycle worker may be handed it
    fuzz_broker.names = sorted(d["name"] for d in fuzz_broker.probe())
    return fuzz_broker


def _worker_replies(sock) -> list[p.Message]:
    out = []
    while sock.poll(20):
        # What the broker sends must decode, batches included.
        out.extend(p.unbatch(p.decode(sock.recv_multipart(), p.WORKER_VERSION)))
    return out


@FUZZ
@given(batch=st.lists(frames_for(p.WORKER_VERSION, WORKER_KINDS, OVERRIDES), min_size=1, max_size=8))
def test_random_worker_frames_are_dropped_and_change_no_domain(broker, batch):
    sock = broker.raw(broker.worker_url, identity=uuidlib.uuid4().bytes)
    try:
        for frames in batch:
            sock.send_multipart(frames)
        broker.stats.messages += len(batch)
        assert sorted(d["name"] for d in broker.probe()) == broker.names
        broker.stats.replies += len(_worker_replies(sock))
    finally:
        sock.close(0)


WORKER_CLASSES = [cls for (version, kind), cls in sorted(p.kinds().items()) if version == p.WORKER_VERSION]


@FUZZ
@given(
    batch=st.lists(
        st.sampled_from(WORKER_CLASSES).flatmap(
            lambda cls: body_for(cls, OVERRIDES, strict=True).map(
                lambda body: [p.WORKER_VERSION, cls.KIND.encode(), packed(body)])
        ),
        min_size=1,
        max_size=8,
    )
)
def test_well_framed_worker_messages_with_hostile_fields(broker, batch):
    """Right version and kind, bodies of the declared field types with hostile values:
    hellos that register fake workers (and get handed the queued job), heartbeats
    naming leases they do not hold, results and label traffic naming anything."""
    test_random_worker_frames_are_dropped_and_change_no_domain.hypothesis.inner_test(broker, batch)


@FUZZ
@given(
    items=st.lists(
        st.sampled_from([cls for cls in WORKER_CLASSES if cls is not p.Batch]).flatmap(
            lambda cls: body_for(cls, OVERRIDES, strict=True).map(lambda body: [cls.KIND, packed(body)])
        ),
        min_size=1,
        max_size=8,
    ),
    junk=st.lists(st.one_of(values, st.lists(values, max_size=3)), max_size=2),
)
def test_batches_of_hostile_worker_messages(broker, items, junk):
    """The same hostile messages, several in one batch, sometimes with malformed items:
    a batch is handled like its messages sent one by one, or dropped whole."""
    batch = [p.WORKER_VERSION, p.Batch.KIND.encode(), packed({"messages": items + junk})]
    test_random_worker_frames_are_dropped_and_change_no_domain.hypothesis.inner_test(broker, [batch])


def test_bad_hellos_are_refused(broker):
    sock = broker.raw(broker.worker_url, identity=b"bad-hello")
    try:
        for role, slots in (("client", 1), ("", 1), ("lifecycle", 0), ("lifecycle", -5), ("security", 0)):
            sock.send_multipart(p.encode(p.Hello(worker_id=f"bad-{role}-{slots}", role=role, host_id="fuzzhost",
                                                 uri="test:///default", slots=slots)))
        broker.probe()
        assert not _worker_replies(sock)  # no welcome
        assert not [w for w in broker.probe_client.workers() if w["worker_id"].startswith("bad-")]
    finally:
        sock.close(0)


def test_results_for_unknown_jobs_and_leases_are_refused(broker):
    sock = broker.raw(broker.worker_url, identity=b"late-worker")
    try:
        # A worker the broker does not know is only asked to register again.
        sock.send_multipart(p.encode(p.Result(worker_id="late-worker", job_id=1, lease_id="x", epoch=1, ok=True)))
        broker.probe()
        assert [type(m) for m in _worker_replies(sock)] == [p.Reregister]
        # Registered (with one slot, busy at once with the queued job, if any), its results
        # for jobs and leases it does not hold are refused.
        sock.send_multipart(p.encode(p.Hello(worker_id="late-worker", role="lifecycle", host_id="fuzzhost",
                                             uri="test:///default", slots=1)))
        for job_id, lease_id in ((999999, "nope"), (1, "not-the-lease"), (-1, ""), (p.MAX_INT, "x")):
            sock.send_multipart(p.encode(p.Result(worker_id="late-worker", job_id=job_id, lease_id=lease_id, epoch=1,
                                                  ok=True, domain_state="running")))
        broker.probe()
        acks = [m for m in _worker_replies(sock) if isinstance(m, p.ResultAck)]
        assert len(acks) == 4 and not any(a.accepted for a in acks), acks
        assert {d["name"]: d["state"] for d in broker.probe()}["fzw-a"] == "shutoff"
    finally:
        sock.close(0)
    assert "refused result from worker late-worker" in broker.cluster.broker.log()


def test_oversize_frame_on_the_worker_socket_is_dropped(broker):
    sock = broker.raw(broker.worker_url, identity=b"big")
    try:
        sock.send_multipart([p.WORKER_VERSION, b"hello", b"\x00" * (p.MAX_FRAME_BYTES + 64 * 1024)])
        assert sorted(d["name"] for d in broker.probe()) == broker.names
    finally:
        sock.close(0)
    broker.stats.messages += 1
