"""Random frames and msgpack bodies on the broker's client socket, and on its local endpoint.

Properties, for every batch hypothesis makes: every message that cannot be a deferred
`wait` gets exactly one reply, each reply decodes as ok or error, no error is 'internal'
(an unexpected exception in a handler), the registry is unchanged, and the broker still
answers `list --all` within the probe deadline.
"""

from __future__ import annotations

import socket

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.conftest import FUZZ, PROBE_DEADLINE_S, REPLY_DEADLINE_S
from tests.fuzz.strategies import (
    NAME_POOL,
    body_for,
    deep,
    frames_for,
    ints,
    packed,
    texts,
    values,
)
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.common import protocol as p
from virtbroker.common import stream

CLIENT_KINDS = sorted(kind for (version, kind) in p.kinds() if version == p.CLIENT_VERSION)
REQUEST_CLASSES = [cls for (version, kind), cls in sorted(p.kinds().items())
                   if version == p.CLIENT_VERSION and kind not in ("ok", "error")]
SINGLE_REQUEST_CLASSES = [cls for cls in REQUEST_CLASSES if cls is not p.ClientBatch]
# Everything but undefine, which would legitimately change the registry.
SAFE_OPS = [op for op in p.JOB_OPS if op != "undefine"]
XML_JUNK = [
    "", "<", "<domain/>", "<domain type='test'/>", "<domain type='test'><name/></domain>",
    "<domain type='test'><name>fz-existing</name></domain>",  # a name taken by another uuid
    "<dom\x00ain/>", "<?xml version='1.0' encoding='UTF-16'?><domain/>", "<a>" * 300,
    "<domain xmlns='urn:x' type='test'><name>x</name></domain>", "\ufeff<domain/>",
]
OVERRIDES = {
    "domain": st.one_of(st.sampled_from(NAME_POOL), texts),
    "op": st.one_of(st.sampled_from(SAFE_OPS), st.text(max_size=10)),
    "xml": st.one_of(st.sampled_from(XML_JUNK), texts),
    "job_id": st.one_of(st.integers(0, 5), ints),
    "job_ids": st.lists(st.one_of(st.integers(0, 5), ints), max_size=5),
    "state": st.one_of(st.none(), st.sampled_from(list(p.JOB_STATES) + ["active", "inactive", "x"]), texts),
    # `ha` true would legitimately redefine fz-other; false leaves an HA-less domain as it is.
    "ha": st.one_of(st.just(False), st.none(), texts, ints),
}


@pytest.fixture(scope="module")
def broker(fuzz_broker):
    c = fuzz_broker.probe_client
    c.define(minimal_domain_xml("fz-existing"))
    c.define(minimal_domain_xml("fz-other"))
    fuzz_broker.baseline = _identity(fuzz_broker.probe())
    return fuzz_broker


def _identity(listing: list[dict]) -> list[tuple]:
    """What no refused request may change: names, uuids, generations and states."""
    return sorted((d["name"], d["uuid"], d["generation"], d["state"]) for d in listing)


def _send_batch(broker, batch: list[list[bytes]]) -> list[p.Message]:
    sock = broker.raw()
    try:
        for frames in batch:
            sock.send_multipart(frames)
        broker.stats.messages += len(batch)
        # A well-formed wait on existing jobs is answered only at its timeout; anything
        # else is answered at once.
        expected = sum(1 for frames in batch if len(frames) < 2 or frames[1] != b"wait")
        replies = broker.collect(sock, expected)
        assert len(replies) >= expected, f"{expected - len(replies)} message(s) got no reply"
        internal = [r for reply in replies for r in p.unbatch(reply) if isinstance(r, p.Error) and r.code == "internal"]
        assert not internal, internal
        return replies
    finally:
        sock.close(0)


@FUZZ
@given(batch=st.lists(frames_for(p.CLIENT_VERSION, CLIENT_KINDS, OVERRIDES), min_size=1, max_size=8))
def test_random_frames_get_an_answer_and_change_nothing(broker, batch):
    _send_batch(broker, batch)
    assert _identity(broker.probe()) == broker.baseline


@FUZZ
@given(
    batch=st.lists(
        st.sampled_from(REQUEST_CLASSES).flatmap(
            lambda cls: body_for(cls, OVERRIDES).map(lambda body: [p.CLIENT_VERSION, cls.KIND.encode(), packed(body)])
        ),
        min_size=1,
        max_size=8,
    )
)
def test_well_framed_requests_with_hostile_fields(broker, batch):
    """Right version, right kind, a map body: so every request reaches decode's field checks,
    and those that pass reach their handler with wrong types, huge ints, NaN, missing and
    extra fields."""
    _send_batch(broker, batch)
    assert _identity(broker.probe()) == broker.baseline


@FUZZ
@given(
    batches=st.lists(
        st.lists(
            st.sampled_from(SINGLE_REQUEST_CLASSES).flatmap(
                lambda cls: body_for(cls, OVERRIDES, strict=True).map(lambda body: [cls.KIND, packed(body)])
            ),
            min_size=1,
            max_size=8,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_batches_of_hostile_requests_get_one_answer_each(broker, batches):
    """Batches whose items mostly decode, so they reach their handlers one after another in
    one turn: each batch gets one reply (its items' replies, or one protocol error), a wait
    among them included."""
    frames = [[p.CLIENT_VERSION, b"batch", packed({"messages": items})] for items in batches]
    replies = _send_batch(broker, frames)
    assert len(replies) == len(batches)
    for reply in replies:
        items = p.unbatch(reply)
        if isinstance(reply, p.Error) and reply.request_id is None:
            assert reply.code == "protocol"  # refused whole
        else:
            assert len(items) in {len(b) for b in batches}
    assert _identity(broker.probe()) == broker.baseline


def test_deep_nesting_and_huge_ints_are_protocol_errors(broker):
    batch = [
        [p.CLIENT_VERSION, b"ping", deep(100000)],
        [p.CLIENT_VERSION, b"ping", packed({"request_id": 2**64 - 1})],
        [p.CLIENT_VERSION, b"ping", packed({"request_id": -(2**63)})],
        [p.CLIENT_VERSION, b"ping", b"\x81\xcf" + b"\x00" * 8 + b"\xc0"],  # an int map key
        [p.CLIENT_VERSION, b"list", packed({"request_id": 1, "state": [[[[[[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]]]]]})],
        [p.CLIENT_VERSION, b"jobs", packed({"request_id": 1, "domain": {"a": [1] * 10}})],
    ]
    replies = _send_batch(broker, batch)
    assert [r.code for r in replies] == ["protocol"] * len(batch)
    assert _identity(broker.probe()) == broker.baseline


def test_oversize_frame_is_dropped_by_the_socket_and_the_broker_keeps_serving(broker):
    sock = broker.raw()
    try:
        # Over MAXMSGSIZE: ZeroMQ drops it (and the connection) before the broker sees it.
        sock.send_multipart([p.CLIENT_VERSION, b"ping", b"\x00" * (p.MAX_FRAME_BYTES + 64 * 1024)])
        assert not sock.poll(int(PROBE_DEADLINE_S * 1000)), "an oversize message was answered"
    finally:
        sock.close(0)
    broker.stats.messages += 1
    assert _identity(broker.probe()) == broker.baseline
    sock = broker.raw()
    try:
        # Under MAXMSGSIZE but over MAX_FRAME_BYTES: the decoder refuses it with an error.
        body = packed({"request_id": 7, "pad": "x" * (p.MAX_FRAME_BYTES + 16)})
        assert p.MAX_FRAME_BYTES < len(body) < p.MAX_FRAME_BYTES + 4096
        # Each frame under the limit, many of them: refused for its frame count.
        many = [p.CLIENT_VERSION, b"ping"] + [b"y" * p.MAX_FRAME_BYTES] * 4
        sock.send_multipart([p.CLIENT_VERSION, b"ping", body])
        sock.send_multipart(many)
        replies = broker.collect(sock, 2)
        assert [r.code for r in replies] == ["protocol", "protocol"]
        assert "over the limit" in replies[0].message and "expected 3 frames" in replies[1].message
    finally:
        sock.close(0)
    broker.stats.messages += 2
    assert _identity(broker.probe()) == broker.baseline


def test_a_peer_that_never_reads_does_not_stall_others(broker):
    """A client that floods pings and reads nothing: the others are still answered."""
    sock = broker.raw()
    try:
        ping = [p.CLIENT_VERSION, b"ping", msgpack.packb({"request_id": 1})]
        for _ in range(20000):
            sock.send_multipart(ping)
        broker.stats.messages += 20000
        assert _identity(broker.probe()) == broker.baseline
    finally:
        sock.close(0)


def test_wait_with_a_nan_timeout_still_ends(broker):
    """Wait promises an answer when the jobs are final or at timeout_s. A NaN timeout_s
    passes the type check (it is a float) and min(max(nan, 0), 3600) is NaN, so the
    deadline is NaN, `now >= deadline` is never true, and the reply never comes while the
    job waits. It should be refused as invalid, or answered like any other timeout."""
    c = broker.probe_client
    job = c.submit("fz-existing", "start")  # no worker: it stays queued
    try:
        sock = broker.raw()
        try:
            sock.send_multipart([p.CLIENT_VERSION, b"wait", packed(
                {"request_id": 1, "job_ids": [job["job_id"]], "timeout_s": float("nan")})])
            replies = broker.collect(sock, 1, deadline_s=5.0)
        finally:
            sock.close(0)
        assert replies, "a wait with timeout_s=NaN was never answered"
    finally:
        c.cancel(job["job_id"])


# ---------------------------------------------------------------------------- the local endpoint
# The same requests over the local endpoint's stream (common/stream.py), and what only a
# stream can get wrong: bytes that are not msgpack, and msgpack that is not a message.


def _stream_replies(broker, data: bytes, expected: int | None) -> tuple[list[p.Message], bool]:
    """Send data on a fresh connection; read replies until `expected` came or the broker closed
    the connection. With expected None, the end of data is the end of the stream (a
    half-close), and the broker closes its side after its replies: read up to that.
    Returns (replies, closed by the broker)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(REPLY_DEADLINE_S)
    try:
        conn.connect(stream.stream_path(broker.cluster.local_url))
        conn.sendall(data)
        if expected is None:
            conn.shutdown(socket.SHUT_WR)
        unpacker = msgpack.Unpacker(raw=False)
        replies: list[p.Message] = []
        closed = False
        while expected is None or len(replies) < expected:
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            unpacker.feed(chunk)
            for frames in unpacker:
                reply = p.decode(frames, p.CLIENT_VERSION, p.MAX_REPLY_BYTES)
                for item in p.unbatch(reply):
                    assert isinstance(item, (p.Ok, p.Error)), item
                    if isinstance(item, p.Error):
                        assert item.code != "internal", item
                        broker.stats.codes[item.code] = broker.stats.codes.get(item.code, 0) + 1
                replies.append(reply)
        broker.stats.replies += len(replies)
        return replies, closed
    finally:
        conn.close()


@FUZZ
@given(batch=st.lists(frames_for(p.CLIENT_VERSION, CLIENT_KINDS, OVERRIDES), min_size=1, max_size=8))
def test_random_frames_on_the_local_stream_get_an_answer_each(broker, batch):
    data = b"".join(stream.encode_message(frames) for frames in batch)
    broker.stats.messages += len(batch)
    expected = sum(1 for frames in batch if len(frames) < 2 or frames[1] != b"wait")
    replies, closed = _stream_replies(broker, data, expected)
    assert len(replies) >= expected, f"{expected - len(replies)} message(s) got no reply"
    assert not closed or len(replies) == expected
    assert _identity(broker.probe()) == broker.baseline


@FUZZ
@given(chunks=st.lists(st.one_of(st.binary(max_size=64), st.builds(packed, values)), min_size=1, max_size=8))
def test_hostile_bytes_on_the_local_stream_get_errors_and_change_nothing(broker, chunks):
    """Random bytes and random msgpack values: each well-framed value that is not a message
    gets a protocol error, bytes that are not msgpack get one and the connection's end."""
    broker.stats.messages += len(chunks)
    replies, closed = _stream_replies(broker, b"".join(chunks), None)
    assert closed, "the broker kept a connection its client had closed"
    for reply in replies:
        if isinstance(reply, p.Error) and reply.request_id is None:
            assert reply.code == "protocol", reply
    assert _identity(broker.probe()) == broker.baseline
