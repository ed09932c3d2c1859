"""The libvirt gateway as a real process beside a real broker and workers."""

from __future__ import annotations

import pytest

from tests.gateway.helpers import start_gateway


@pytest.fixture
def test_gateway(cluster_factory):
    """A broker, one lifecycle worker on test:///default and the gateway."""
    cluster = cluster_factory(lease_ttl_s=3.0)
    cluster.start_broker()
    cluster.start_worker("w1")
    cluster.wait_workers(1)
    gateway = start_gateway(cluster)
    yield cluster, gateway
    log = gateway.log()
    assert "Traceback" not in log, log[-4000:]
