"""Fixtures for the etcd backend's tests: a real three-member etcd cluster, always closed."""

import pytest

from tests.etcd_cluster import EtcdCluster
from virtbroker.broker.etcd_store import EtcdBackend


@pytest.fixture
def etcd_cluster(tmp_path):
    """Three etcd processes on loopback; killed and their data dirs removed at the end, pass or fail."""
    cluster = EtcdCluster(tmp_path, members=3)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def etcd_backends(etcd_cluster):
    """Make EtcdBackends on the cluster (as several brokers would); all closed at the end."""
    made: list[EtcdBackend] = []

    def make(**kw) -> EtcdBackend:
        backend = EtcdBackend(etcd_cluster.endpoints, **kw)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()
