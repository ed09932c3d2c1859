"""Fixtures of the integration tests."""

import pytest


@pytest.fixture
def cluster(cluster_factory):
    """A broker and one lifecycle worker, w1, on libvirt's embedded test driver."""
    c = cluster_factory()
    c.start_broker()
    c.start_worker("w1")
    c.wait_workers(1)
    return c
