"""Fixtures shared by every test folder."""

import pytest

from tests.procs import Cluster


@pytest.fixture
def cluster_factory(tmp_path_factory):
    """Make clusters of real processes; every process is stopped at the end, pass or fail."""
    made: list[Cluster] = []

    def make(**kw) -> Cluster:
        state_dir = tmp_path_factory.mktemp("vb")
        cluster = Cluster(state_dir, **kw)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()
