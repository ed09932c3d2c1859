"""The XDR codec, the frame header and remote_error, and the lifecycle translator: pure, no processes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtbroker.common import protocol as p
from virtbroker.gateway import rpc
from virtbroker.gateway.events import LifecycleTranslator
from virtbroker.gateway.rpc import Header, RemoteError
from virtbroker.gateway.xdr import Packer, Unpacker, XdrError


@given(
    i=st.integers(-(2**31), 2**31 - 1),
    u=st.integers(0, 2**32 - 1),
    h=st.integers(0, 2**64 - 1),
    s=st.text(max_size=50),
    o=st.one_of(st.none(), st.text(max_size=10)),
    raw=st.binary(min_size=16, max_size=16),
)
def test_round_trip(i, u, h, s, o, raw):
    data = bytes(Packer().int(i).uint(u).uhyper(h).string(s).optional_string(o).opaque_fixed(raw))
    assert len(data) % 4 == 0
    r = Unpacker(data)
    assert (r.int(), r.uint(), r.uhyper(), r.string(), r.optional_string(), r.opaque_fixed(16)) == (i, u, h, s, o, raw)
    r.done()


@given(data=st.binary(max_size=64))
def test_decoding_garbage_raises_only_xdr_error(data):
    r = Unpacker(data)
    try:
        r.int()
        r.optional_string()
        r.string(max_bytes=16)
        r.done()
    except XdrError:
        pass


def test_char_array_is_one_word_per_char():
    assert bytes(Packer().char_array("ab", fixed=4)) == b"\0\0\0a\0\0\0b" + b"\0" * 8
    assert bytes(Packer().char_array("")) == b"\0\0\0\0"


def test_limits_and_leftovers():
    with pytest.raises(XdrError):
        Unpacker(bytes(Packer().uint(2**31))).string()
    with pytest.raises(XdrError):
        Unpacker(b"\0\0\0\1a\1\0\0").string()  # non-zero padding
    with pytest.raises(XdrError):
        Unpacker(b"\0\0\0\2").bool()
    r = Unpacker(b"\0\0\0\1\0\0\0\2")
    r.int()
    with pytest.raises(XdrError):
        r.done()


def test_header_and_error():
    h = Header(rpc.REMOTE_PROGRAM, 1, 23, rpc.TYPE_CALL, 7, rpc.STATUS_OK)
    assert Header.unpack(h.pack()) == h
    reply = h.reply(rpc.STATUS_ERROR)
    assert (reply.proc, reply.serial, reply.type, reply.status) == (23, 7, rpc.TYPE_REPLY, rpc.STATUS_ERROR)
    err = RemoteError(rpc.ERR_NO_DOMAIN, "Domain not found: no domain with matching name 'x'")
    assert rpc.decode_error(err.body()) == (rpc.ERR_NO_DOMAIN, rpc.FROM_QEMU, err.message)
    frame = rpc.frame(h, b"abcd")
    assert rpc.frame_length(frame[:4]) == len(frame) == 4 + 24 + 4


def _dom(seq, event, state, uuid="u1", name="g"):
    return p.DomainEvent(seq=seq, uuid=uuid, name=name, event=event, state=state)


def _job(seq, op, state, uuid="u1"):
    return p.JobEvent(seq=seq, job_id=seq, uuid=uuid, op=op, state=state)


def test_translator():
    t = LifecycleTranslator()
    t.seed([])
    pairs = lambda evs: [(e.event, e.detail) for e in evs]  # noqa: E731
    assert pairs(t.on_domain(_dom(1, "defined", "shutoff"))) == [(rpc.EV_DEFINED, rpc.DETAIL_DEFINED_ADDED)]
    assert pairs(t.on_domain(_dom(2, "defined", "shutoff"))) == [(rpc.EV_DEFINED, rpc.DETAIL_DEFINED_UPDATED)]
    t.on_job(_job(3, "start", "running"))
    assert pairs(t.on_domain(_dom(4, "state", "running"))) == [(rpc.EV_STARTED, 0)]
    assert pairs(t.on_domain(_dom(5, "state", "running"))) == []  # a host change only
    assert pairs(t.on_domain(_dom(6, "state", "paused"))) == [(rpc.EV_SUSPENDED, 0)]
    assert pairs(t.on_domain(_dom(7, "state", "running"))) == [(rpc.EV_RESUMED, 0)]
    reboot = t.on_job(_job(8, "reboot", "succeeded"))
    assert [e.event_id for e in reboot] == [rpc.EVENT_ID_REBOOT]
    t.on_job(_job(9, "destroy", "running"))
    assert pairs(t.on_domain(_dom(10, "state", "shutoff"))) == [(rpc.EV_STOPPED, rpc.DETAIL_STOPPED_DESTROYED)]
    t.on_job(_job(11, "start", "running"))
    t.on_domain(_dom(12, "state", "running"))
    t.on_job(_job(13, "shutdown", "running"))
    assert pairs(t.on_domain(_dom(14, "state", "shutoff"))) == [(rpc.EV_STOPPED, rpc.DETAIL_STOPPED_SHUTDOWN)]
    assert pairs(t.on_domain(_dom(15, "undefined", "shutoff"))) == [(rpc.EV_UNDEFINED, 0)]
    # After a gap: the differences.
    t.seed([{"uuid": "a", "name": "a", "state": "running"}, {"uuid": "b", "name": "b", "state": "shutoff"}])
    diff = t.resync([{"uuid": "a", "name": "a", "state": "shutoff"}, {"uuid": "c", "name": "c", "state": "running"}])
    assert sorted((e.uuid, e.event) for e in diff) == [
        ("a", rpc.EV_STOPPED), ("b", rpc.EV_UNDEFINED), ("c", rpc.EV_DEFINED), ("c", rpc.EV_STARTED)]


def test_transient_guests_get_no_define_events():
    t = LifecycleTranslator(is_transient=lambda uuid: True)
    t.seed([])
    assert [e.event for e in t.on_domain(_dom(1, "defined", "shutoff"))] == []
    assert [e.event for e in t.on_domain(_dom(2, "state", "running"))] == [rpc.EV_STARTED]
    assert [e.event for e in t.on_domain(_dom(3, "state", "shutoff"))] == [rpc.EV_STOPPED]
    assert [e.event for e in t.on_domain(_dom(4, "undefined", "shutoff"))] == []


def test_job_errors_map_to_libvirt():
    from virtbroker.gateway.domains import job_error

    lost = job_error({"job_id": 42, "state": "lost", "error_code": "deadline", "error": "past its deadline"})
    assert lost.code == rpc.ERR_OPERATION_FAILED and "job 42 was lost" in lost.message
    refused = job_error({"job_id": 1, "state": "failed", "error_code": "operation-invalid",
                         "error": "Requested operation is not valid: domain 'g' is not running"})
    assert refused.code == rpc.ERR_OPERATION_INVALID and refused.message.count("Requested operation") == 1
    gone = job_error({"job_id": 2, "state": "failed", "error_code": "not-found", "error": "no domain 'g'"})
    assert gone.code == rpc.ERR_NO_DOMAIN
    driver = job_error({"job_id": 3, "state": "failed", "error_code": "driver", "error": "qemu died"})
    assert driver.code == rpc.ERR_OPERATION_FAILED and driver.message == "operation failed: qemu died"
