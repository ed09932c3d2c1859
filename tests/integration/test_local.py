"""The local endpoint: the client protocol over a UNIX stream socket, served by a real broker."""

from __future__ import annotations

import socket

import msgpack
import pytest

from virtbroker.client.api import Client
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.common import protocol as p
from virtbroker.common import stream
from virtbroker.common.errors import NotFoundError, UnavailableError

REPLY_TIMEOUT_S = 5.0


class RawStream:
    """A hand-driven connection to the local endpoint: bytes out, decoded messages in."""

    def __init__(self, url: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(REPLY_TIMEOUT_S)
        self.sock.connect(stream.stream_path(url))
        self.unpacker = msgpack.Unpacker(raw=False)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, msg: p.Message) -> None:
        self.send(stream.encode_message(p.encode(msg)))

    def reply(self) -> p.Message:
        """The next message, decoded; AssertionError if the broker closed the connection first."""
        while True:
            for frames in self.unpacker:
                return p.decode(frames, p.CLIENT_VERSION, p.MAX_REPLY_BYTES)
            data = self.sock.recv(65536)
            assert data, "the broker closed the connection"
            self.unpacker.feed(data)

    def closed_by_broker(self) -> bool:
        """True when the broker closes the connection (end of stream) with nothing more to read."""
        return self.sock.recv(65536) == b""

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(cluster):
    opened: list[RawStream] = []

    def connect() -> RawStream:
        conn = RawStream(cluster.local_url)
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        conn.close()


def _identity(client: Client) -> list[tuple]:
    return sorted((d["name"], d["uuid"], d["generation"], d["state"]) for d in client.list(all=True))


def test_local_endpoint_serves_the_client_protocol(cluster):
    """Everything the client endpoint does, over the stream, on the same registry and queues."""
    local = cluster.client(url=cluster.local_url)
    remote = cluster.client()
    created = local.define(minimal_domain_xml("lc-a"))
    assert created["created"] and created["state"] == "shutoff"
    assert remote.lookup("lc-a")["uuid"] == created["uuid"]  # one registry behind both
    final = local.run("lc-a", "start", timeout_s=30)
    assert final["state"] == "succeeded", final
    assert remote.lookup("lc-a")["state"] == "running"
    assert "<name>lc-a</name>" in local.dumpxml("lc-a")
    # A batch: each item answered in order, a refused one in its place.
    lookups = local.call_many([p.Lookup(request_id=0, domain=name) for name in ("lc-a", "lc-none", "lc-a")])
    assert lookups[0]["state"] == lookups[2]["state"] == "running"
    assert isinstance(lookups[1], NotFoundError)
    with pytest.raises(NotFoundError):
        local.lookup("lc-none")
    assert [d["name"] for d in local.list()] == ["lc-a"]
    assert local.run("lc-a", "destroy", timeout_s=30)["state"] == "succeeded"


def test_bad_messages_get_a_protocol_error_and_the_connection_goes_on(cluster, raw):
    client = cluster.client()
    client.define(minimal_domain_xml("lc-keep"))
    before = _identity(client)
    conn = raw()
    refused = [
        msgpack.packb(5),  # not an array
        msgpack.packb([]),  # no frames
        msgpack.packb(["VBC1", "ping", "\x80"]),  # str where frames are bin
        msgpack.packb([b"x"] * (stream.MAX_FRAMES + 1)),  # too many frames
        stream.encode_message([b"VBC9", b"ping", msgpack.packb({"request_id": 1})]),  # wrong version
        stream.encode_message(p.encode(p.Define(request_id=2, xml="<domain"))),  # decodes; the handler refuses
    ]
    for data in refused:
        conn.send(data)
        reply = conn.reply()
        assert isinstance(reply, p.Error), reply
        assert reply.code in ("protocol", "invalid"), reply
    conn.request(p.Ping(request_id=3))
    assert isinstance(conn.reply(), p.Ok)  # the same connection still works
    assert _identity(client) == before


@pytest.mark.parametrize(
    "garbage, why",
    [
        (b"\xc1", "not msgpack"),  # a byte msgpack never uses
        (msgpack.packb([b"x" * (p.MAX_FRAME_BYTES + 8192)]), "over the limit"),
    ],
    ids=["not-msgpack", "oversize"],
)
def test_an_unreadable_stream_gets_one_error_then_is_closed(cluster, raw, garbage, why):
    client = cluster.client()
    before = _identity(client)
    conn = raw()
    conn.request(p.Ping(request_id=1))
    assert isinstance(conn.reply(), p.Ok)
    conn.send(garbage + stream.encode_message(p.encode(p.Ping(request_id=2))))
    reply = conn.reply()
    assert isinstance(reply, p.Error) and reply.code == "protocol" and why in reply.message, reply
    assert reply.request_id is None
    assert conn.closed_by_broker()  # the ping after the garbage is never read
    assert _identity(client) == before
    assert cluster.client(url=cluster.local_url).ping()["domains"] == len(before)


def test_a_flood_in_one_write_is_answered_whole_and_in_order(cluster, raw):
    """2,000 pings arrive in one read; the broker handles 200 a turn (BATCH_MAX_MESSAGES)
    and must come back for the rest with nothing more to read on the socket."""
    conn = raw()
    conn.send(b"".join(stream.encode_message(p.encode(p.Ping(request_id=i))) for i in range(1, 2001)))
    other = cluster.client(url=cluster.local_url)
    assert other.ping()["domains"] == 0  # another client is served while the flood is worked off
    replies = [conn.reply() for _ in range(2000)]
    assert [r.request_id for r in replies] == list(range(1, 2001))
    assert all(isinstance(r, p.Ok) for r in replies)


def test_a_client_that_leaves_mid_wait_changes_nothing_for_others(cluster, raw):
    client = cluster.client(url=cluster.local_url)
    client.define(minimal_domain_xml("lc-w"))
    job = client.submit("lc-w", "start")
    conn = raw()
    conn.request(p.Wait(request_id=1, job_ids=[job["job_id"]], timeout_s=30))
    conn.close()  # its reply will have nowhere to go
    assert client.wait([job["job_id"]], 30)[0]["state"] == "succeeded"
    # Many connections come and go; the broker keeps none of them.
    for _ in range(50):
        raw().request(p.Ping(request_id=1))
    assert client.ping()["domains"] == 1
    assert cluster.broker.alive()


def test_acknowledged_work_survives_kill9_and_the_client_reconnects(cluster):
    """kill -9 leaves the socket file behind: the next broker replaces it. The Client's
    connection is gone with the broker; its next call says so, and the one after connects."""
    client = cluster.client(url=cluster.local_url, timeout_s=REPLY_TIMEOUT_S)
    uuid = client.define(minimal_domain_xml("lc-k"))["uuid"]
    cluster.broker.kill9()
    with pytest.raises(UnavailableError, match="lost the connection"):
        client.ping()
    cluster.start_broker()
    assert client.lookup("lc-k")["uuid"] == uuid


def test_no_broker_is_a_clear_error(tmp_path):
    with Client(f"unix://{tmp_path}/local.sock") as client:
        with pytest.raises(UnavailableError, match="cannot connect to the broker at unix://"):
            client.ping()
