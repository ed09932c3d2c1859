"""Random input on the libvirt gateway's socket: random bytes, bad length words, valid headers with
garbage bodies, unknown programs and procedures, calls before CONNECT_OPEN, many dropped
connections. Each gets libvirt's error or a closed connection, the registry does not change, no
handler raises, and other connections keep being served."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.conftest import FUZZ
from tests.gateway.helpers import start_gateway
from tests.gateway.rawclient import RawClient
from tests.procs import Cluster
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.gateway import rpc
from virtbroker.gateway.handlers import DISPATCH
from virtbroker.gateway.rpc import Header
from virtbroker.gateway.xdr import Packer

PROCS = sorted(DISPATCH)
# Procedures whose empty body is a valid call that would end the connection or its open state.
CLOSING = {rpc.PROC_CONNECT_CLOSE}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("fzgw"), lease_ttl_s=2.0)
    try:
        cluster.start_broker()
        c = cluster.client()
        c.define(minimal_domain_xml("fz-existing"))
        gw = start_gateway(cluster)
        gw.cluster = cluster
        gw.baseline = _identity(cluster)
        yield gw
        log = gw.log()
        assert gw.alive(), log[-3000:]
        assert "Traceback" not in log, log[-5000:]
    finally:
        cluster.stop()


def _identity(cluster: Cluster) -> list[tuple]:
    return sorted((d["name"], d["uuid"], d["generation"], d["state"]) for d in cluster.client().list(all=True))


def _probe(gw) -> None:
    """Another connection is served at once, and nothing changed."""
    with RawClient(gw.path, timeout_s=2.0) as c:
        c.open()
        header, body = c.call(rpc.PROC_CONNECT_LIST_ALL_DOMAINS, bytes(Packer().int(1).uint(0)))
        assert header.status == rpc.STATUS_OK, rpc.decode_error(body)
    assert _identity(gw.cluster) == gw.baseline


def _frames_until_closed(c: RawClient, replies_wanted: int) -> list[tuple[Header, bytes]]:
    got = []
    while len(got) < replies_wanted:
        try:
            frame = c.recv()
        except (TimeoutError, ConnectionResetError):
            break
        if frame is None:
            break
        got.append(frame)
    return got


def _check_reply(header: Header, body: bytes) -> None:
    if header.prog == rpc.KEEPALIVE_PROGRAM:
        assert header.proc == rpc.KEEPALIVE_PONG
        return
    assert header.type == rpc.TYPE_REPLY
    if header.status == rpc.STATUS_ERROR:
        code, domain, message = rpc.decode_error(body)
        assert code != rpc.ERR_INTERNAL_ERROR or "not open" in message or "already open" in message, message


@FUZZ
@given(data=st.binary(min_size=1, max_size=600))
def test_random_bytes(gateway, data):
    with RawClient(gateway.path, timeout_s=2.0) as c:
        c.sock.sendall(data)
        c.sock.shutdown(socket.SHUT_WR)
        for header, body in _frames_until_closed(c, 50):
            _check_reply(header, body)
    _probe(gateway)


@pytest.mark.parametrize("length", [0, 1, 27, 64 * 1024 * 1024, 2**32 - 1])
def test_bad_length_word_closes(gateway, length):
    with RawClient(gateway.path, timeout_s=5.0) as c:
        c.sock.sendall(struct.pack(">I", length) + b"\0" * 64)
        assert c.recv() is None  # closed, with no reply
    _probe(gateway)


@FUZZ
@given(proc=st.sampled_from(PROCS), body=st.binary(min_size=1, max_size=300))
def test_garbage_body(gateway, proc, body):
    with RawClient(gateway.path, timeout_s=5.0) as c:
        c.open()
        header, reply = c.call(proc, body)
        assert header.proc == proc
        _check_reply(header, reply)
    _probe(gateway)


@FUZZ
@given(
    prog=st.one_of(st.sampled_from([rpc.REMOTE_PROGRAM, rpc.QEMU_PROGRAM, 0, 0xFFFFFFFF]), st.integers(0, 2**32 - 1)),
    vers=st.integers(0, 3),
    proc=st.one_of(st.sampled_from(PROCS), st.integers(-(2**31), 2**31 - 1)),
    kind=st.integers(0, 6),
    opened=st.booleans(),
    body=st.binary(max_size=64),
)
def test_headers(gateway, prog, vers, proc, kind, opened, body):
    if prog == rpc.REMOTE_PROGRAM and vers == 1 and proc in CLOSING:
        return
    with RawClient(gateway.path, timeout_s=3.0) as c:
        if opened:
            c.open()
        serial = c.send_call(proc, body, prog=prog, vers=vers, kind=kind)
        # A call gets exactly one reply with its serial; anything else gets none.
        marker = c.send_call(rpc.PROC_AUTH_LIST)
        replies = []
        while True:
            got = c.recv()
            assert got is not None, "connection closed"
            header, reply = got
            _check_reply(header, reply)
            if header.serial == marker and header.proc == rpc.PROC_AUTH_LIST:
                break
            replies.append((header, reply))
        if kind == rpc.TYPE_CALL:
            assert [h.serial for h, _ in replies] == [serial]
            if prog != rpc.REMOTE_PROGRAM or vers != 1:
                header, reply = replies[0]
                assert header.status == rpc.STATUS_ERROR
                assert rpc.decode_error(reply)[:2] == (rpc.ERR_RPC, rpc.FROM_RPC)
        else:
            assert replies == []
    _probe(gateway)


def test_unknown_program_and_procedure(gateway):
    with RawClient(gateway.path) as c:
        c.open()
        header, body = c.reply_to(c.send_call(1, prog=0x12345678))
        assert header.status == rpc.STATUS_ERROR
        assert rpc.decode_error(body)[:2] == (rpc.ERR_RPC, rpc.FROM_RPC)
        header, body = c.call(999)
        code, domain, message = rpc.decode_error(body)
        # What libvirtd answers, which the client turns into VIR_ERR_NO_SUPPORT.
        assert (code, domain) == (rpc.ERR_RPC, rpc.FROM_RPC) and message.startswith("unknown procedure")
        header, body = c.call(rpc.PROC_CONNECT_LIST_ALL_STORAGE_POOLS, bytes(Packer().int(1).uint(0)))
        assert rpc.decode_error(body)[2].startswith("unknown procedure")


def test_call_before_open(gateway):
    with RawClient(gateway.path) as c:
        header, body = c.call(rpc.PROC_CONNECT_LIST_ALL_DOMAINS, bytes(Packer().int(1).uint(0)))
        assert header.status == rpc.STATUS_ERROR
        assert rpc.decode_error(body)[2] == "internal error: connection not open"
        header, body = c.call(rpc.PROC_DOMAIN_DEFINE_XML, bytes(Packer().string(minimal_domain_xml("fz-new"))))
        assert header.status == rpc.STATUS_ERROR
    _probe(gateway)


def test_keepalive(gateway):
    with RawClient(gateway.path) as c:
        c.send_call(rpc.KEEPALIVE_PING, prog=rpc.KEEPALIVE_PROGRAM, kind=rpc.TYPE_MESSAGE)
        header, body = c.recv()
        assert (header.prog, header.proc, header.type, body) == (rpc.KEEPALIVE_PROGRAM, rpc.KEEPALIVE_PONG, rpc.TYPE_MESSAGE, b"")


def test_thousand_dropped_connections(gateway):
    for i in range(1000):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(gateway.path)
        if i % 3 == 1:
            s.sendall(b"\0\0\0")  # a partial length word
        elif i % 3 == 2:
            s.sendall(rpc.frame(Header(rpc.REMOTE_PROGRAM, 1, rpc.PROC_AUTH_LIST, 0, i, 0))[:30])  # a partial frame
        s.close()
    _probe(gateway)
