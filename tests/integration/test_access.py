"""CURVE on every endpoint: each kind of key reaches only what it may; ipc sockets are owner-only."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from tests.procs import ROOT
from virtbroker.client.api import Client
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.common import protocol as p
from virtbroker.common.errors import PermissionError_, UnavailableError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(curve_dir, *args):
    subprocess.run([sys.executable, "-m", "virtbroker.launcher", "keygen", str(curve_dir), *args], check=True, cwd=str(ROOT),
                   capture_output=True)


@pytest.fixture
def secured(cluster_factory, tmp_path):
    curve = tmp_path / "curve"
    keygen(curve)
    keygen(curve, "--client", "alice")
    keygen(curve, "--worker", "w1", "--role", "lifecycle", "--host", "h1")
    keygen(curve, "--readonly", "bob")
    ports = {name: free_port() for name in ("client", "worker", "events", "readonly")}
    urls = {name: f"tcp://127.0.0.1:{port}" for name, port in ports.items()}
    cluster = cluster_factory(extra=[
        "--client-url", urls["client"], "--worker-url", urls["worker"], "--events-url", urls["events"],
        "--readonly-url", urls["readonly"], "--curve-dir", str(curve),
        "--curve-server-key", str(curve / "server.key"), "--curve-secret-key", str(curve / "keys" / "w1.key_secret"),
    ])
    cluster.client_url = urls["client"]
    os.environ["VIRTBROKER_SERVER_KEY"] = str(curve / "server.key")
    os.environ["VIRTBROKER_CLIENT_KEY"] = str(curve / "keys" / "alice.key_secret")
    try:
        cluster.start_broker()  # the readiness ping authenticates as alice
        cluster.start_worker("w1")
        cluster.wait_workers(1)
        yield cluster, curve, urls
    finally:
        os.environ.pop("VIRTBROKER_SERVER_KEY", None)
        os.environ.pop("VIRTBROKER_CLIENT_KEY", None)


def handshake(url: str, curve, secret: str | None) -> int:
    """Connect a DEALER with the given secret key (or none) and return the first handshake event."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if secret is not None:
        from virtbroker.common.curve import use_as_client

        use_as_client(sock, str(curve / "server.key"), str(curve / "keys" / f"{secret}.key_secret"))
    monitor = sock.get_monitor_socket(
        zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_DISCONNECTED
    )
    try:
        sock.connect(url)
        # On the worker endpoint this would register a worker, if the handshake let it through.
        sock.send_multipart(p.encode(p.Hello(worker_id=f"as-{secret}", role="lifecycle", host_id="x", uri="u", slots=1)))
        assert monitor.poll(5000), "no handshake event"
        return recv_monitor_message(monitor)["event"]
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
        ctx.term()


def test_each_key_reaches_only_its_endpoints(secured):
    cluster, curve, urls = secured
    ok = zmq.EVENT_HANDSHAKE_SUCCEEDED
    # A client key cannot register as a worker; a worker key cannot act as a client.
    assert handshake(urls["worker"], curve, "alice") == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    assert handshake(urls["worker"], curve, "bob") == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    assert handshake(urls["client"], curve, "w1") == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    assert handshake(urls["client"], curve, "bob") == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    assert handshake(urls["worker"], curve, "w1") == ok
    assert handshake(urls["client"], curve, "alice") == ok
    assert handshake(urls["readonly"], curve, "bob") == ok
    # No key at all: the CURVE handshake cannot even start.
    assert handshake(urls["client"], curve, None) != ok
    with Client(urls["client"], timeout_s=10) as c:
        workers = c.workers()
    # Only the worker key's hello registered; the client and read-only keys' hellos never arrived.
    assert sorted(w["worker_id"] for w in workers) == ["as-w1", "w1"]


def test_unauthorized_client_gets_no_answer(secured):
    cluster, curve, urls = secured
    with Client(urls["client"], timeout_s=2, server_key=str(curve / "server.key"),
                secret_key=str(curve / "keys" / "bob.key_secret")) as c:
        with pytest.raises(UnavailableError):
            c.define(minimal_domain_xml("sneaky"))
    with Client(urls["client"], timeout_s=10) as alice:
        assert alice.list(all=True) == []


def test_readonly_endpoint_reads_but_refuses_changes(secured):
    cluster, curve, urls = secured
    with Client(urls["client"], timeout_s=10) as alice:
        alice.define(minimal_domain_xml("shown"))
        job = alice.submit("shown", "start")
        alice.wait([job["job_id"]], 30)
    with Client(urls["readonly"], timeout_s=10, server_key=str(curve / "server.key"),
                secret_key=str(curve / "keys" / "bob.key_secret")) as bob:
        assert [d["name"] for d in bob.list()] == ["shown"]
        assert bob.lookup("shown")["state"] == "running"
        assert bob.job(job["job_id"])["state"] == "succeeded"
        with pytest.raises(PermissionError_):
            bob.define(minimal_domain_xml("nope"))
        with pytest.raises(PermissionError_):
            bob.submit("shown", "destroy")
        with pytest.raises(PermissionError_):
            bob.cancel(job["job_id"])
        looked, refused = bob.call_many(
            [p.Lookup(request_id=0, domain="shown"), p.Submit(request_id=0, domain="shown", op="destroy")]
        )
        assert looked["state"] == "running" and isinstance(refused, PermissionError_)
    with Client(urls["client"], timeout_s=10) as alice:
        assert alice.lookup("shown")["state"] == "running"
        alice.run("shown", "destroy")


def test_ipc_and_local_sockets_are_owner_only(cluster_factory):
    cluster = cluster_factory()
    cluster.start_broker()
    for name in ("client.sock", "worker.sock", "events.sock", "local.sock"):
        mode = stat.S_IMODE(os.stat(cluster.state_dir / name).st_mode)
        assert mode & 0o077 == 0, f"{name} is {oct(mode)}"
