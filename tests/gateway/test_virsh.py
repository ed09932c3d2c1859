"""virsh 9.0, unmodified, against the gateway: each verb's usual output and exit status, events of
changes made through vbctl, and the read-only socket's refusals. Guests on test:///default."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from tests.gateway.helpers import virsh
from virtbroker.client.templates import minimal_domain_xml


@pytest.fixture
def guest_file(tmp_path):
    path = tmp_path / "gw1.xml"
    path.write_text(minimal_domain_xml("gw1"))
    return str(path)


def test_lifecycle_verbs(test_gateway, guest_file):
    cluster, gw = test_gateway
    u = gw.uri
    out = virsh(u, "list", "--all", check=True).stdout
    assert re.search(r"Id\s+Name\s+State", out)
    assert virsh(u, "define", guest_file, check=True).stdout.strip() == f"Domain 'gw1' defined from {guest_file}"
    assert re.search(r"-\s+gw1\s+shut off", virsh(u, "list", "--all", check=True).stdout)
    assert virsh(u, "domstate", "gw1", check=True).stdout.strip() == "shut off"
    uuid = virsh(u, "domuuid", "gw1", check=True).stdout.strip()
    assert uuid == cluster.client().lookup("gw1")["uuid"]

    info = virsh(u, "dominfo", "gw1", check=True).stdout
    assert re.search(r"Id:\s+-", info) and re.search(r"State:\s+shut off", info)
    assert re.search(r"Persistent:\s+yes", info) and re.search(r"Max memory:\s+65536 KiB", info)

    assert virsh(u, "start", "gw1", check=True).stdout.strip() == "Domain 'gw1' started"
    listing = virsh(u, "list", check=True).stdout
    match = re.search(r"(\d+)\s+gw1\s+running", listing)
    assert match, listing
    domain_id = match.group(1)
    # The id is stable while the guest runs, and a lookup by id finds it.
    assert re.search(rf"Id:\s+{domain_id}\b", virsh(u, "dominfo", "gw1", check=True).stdout)
    assert virsh(u, "domname", domain_id, check=True).stdout.strip() == "gw1"
    assert virsh(u, "domstate", uuid, check=True).stdout.strip() == "running"
    assert "<name>gw1</name>" in virsh(u, "dumpxml", "gw1", check=True).stdout

    assert virsh(u, "suspend", "gw1", check=True).stdout.strip() == "Domain 'gw1' suspended"
    assert virsh(u, "domstate", "gw1", check=True).stdout.strip() == "paused"
    assert virsh(u, "resume", "gw1", check=True).stdout.strip() == "Domain 'gw1' resumed"
    assert virsh(u, "reboot", "gw1", check=True).stdout.strip() == "Domain 'gw1' is being rebooted"
    assert virsh(u, "shutdown", "gw1", check=True).stdout.strip() == "Domain 'gw1' is being shutdown"
    assert virsh(u, "domstate", "gw1", check=True).stdout.strip() == "shut off"
    virsh(u, "start", "gw1", check=True)
    assert virsh(u, "destroy", "gw1", check=True).stdout.strip() == "Domain 'gw1' destroyed"

    # A state libvirt refuses: the broker's refusal with libvirt's wording and exit 1.
    refused = virsh(u, "destroy", "gw1")
    assert refused.returncode == 1
    assert "Requested operation is not valid" in refused.stderr and "not running" in refused.stderr

    assert virsh(u, "undefine", "gw1", check=True).stdout.strip() == "Domain 'gw1' has been undefined"
    assert "gw1" not in virsh(u, "list", "--all", check=True).stdout
    assert cluster.client().list(all=True) == []


def test_missing_domain(test_gateway):
    _, gw = test_gateway
    for verb in ("dominfo", "domstate", "start", "destroy", "undefine", "dumpxml"):
        result = virsh(gw.uri, verb, "no-such-guest")
        assert result.returncode == 1, (verb, result)
        assert "error: failed to get domain 'no-such-guest'" in result.stderr, (verb, result.stderr)


def test_bad_definition(test_gateway, tmp_path):
    _, gw = test_gateway
    bad = tmp_path / "bad.xml"
    bad.write_text("<domain type='test'><name>x</name><bogus/></domain>")
    result = virsh(gw.uri, "define", str(bad))
    assert result.returncode == 1
    assert "error: Failed to define domain" in result.stderr and "XML error" in result.stderr


def test_read_only_socket(test_gateway, guest_file):
    cluster, gw = test_gateway
    virsh(gw.uri, "define", guest_file, check=True)
    # Reads are served.
    assert re.search(r"-\s+gw1\s+shut off", virsh(gw.ro_uri, "list", "--all", check=True).stdout)
    assert virsh(gw.ro_uri, "domstate", "gw1", check=True).stdout.strip() == "shut off"
    for args, api in (
        (("define", guest_file), "virDomainDefineXML"),
        (("start", "gw1"), "virDomainCreate"),
        (("destroy", "gw1"), "virDomainDestroy"),
        (("undefine", "gw1"), "virDomainUndefine"),
    ):
        result = virsh(gw.ro_uri, *args)
        assert result.returncode == 1
        assert f"operation forbidden: read only access prevents {api}" in result.stderr, result.stderr
    # Nothing changed.
    assert [(d["name"], d["state"], d["generation"]) for d in cluster.client().list(all=True)] == [("gw1", "shutoff", 1)]
    # A read-only open on the read-write socket is read-only too (virsh -r).
    result = subprocess.run(["virsh", "-r", "-c", gw.uri, "start", "gw1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "read only" in result.stderr


def test_events_of_changes_through_vbctl(test_gateway, tmp_path):
    """`virsh event --all --loop` prints the lifecycle events of guests changed through vbctl."""
    cluster, gw = test_gateway
    events = subprocess.Popen(
        ["virsh", "-c", gw.uri, "event", "--all", "--loop"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    vbctl = [sys.executable, "-m", "virtbroker.client.vbctl", "--connect", cluster.local_url]
    try:
        # virsh registers its callbacks at its own pace: define and undefine a probe guest
        # until its events show, so nothing later can fall before the registration.
        probe = tmp_path / "probe.xml"
        probe.write_text(minimal_domain_xml("gw-probe"))
        lines = []
        deadline = time.monotonic() + 30
        while not any("gw-probe" in line for line in lines):
            assert time.monotonic() < deadline, lines
            subprocess.run(vbctl + ["define", str(probe)], check=True, capture_output=True)
            subprocess.run(vbctl + ["undefine", "gw-probe"], check=True, capture_output=True)
            lines.append(events.stdout.readline())
        # Drain the probe's events: the next lines must be the guest's.
        guest = tmp_path / "gw1.xml"
        guest.write_text(minimal_domain_xml("gw1"))
        for argv in (["define", str(guest)], ["start", "gw1"], ["suspend", "gw1"], ["resume", "gw1"],
                     ["destroy", "gw1"], ["start", "gw1"], ["shutdown", "gw1"], ["undefine", "gw1"]):
            subprocess.run(vbctl + argv, check=True, capture_output=True)
        expected = [
            "Defined Added", "Started Booted", "Suspended Paused", "Resumed Unpaused", "Stopped Destroyed",
            "Started Booted", "Stopped Shutdown", "Undefined Removed",
        ]
        seen = []
        while len(seen) < len(expected):
            line = events.stdout.readline()
            assert line, f"virsh event ended; saw {seen}"
            if "'gw1'" in line:
                assert line.startswith("event 'lifecycle' for domain 'gw1': "), line
                seen.append(line.strip().split(": ", 1)[1])
        assert seen == expected
    finally:
        events.kill()
        events.wait(timeout=10)
