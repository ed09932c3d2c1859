"""kill -9 of the broker at random points during 1,000 defines and 100 starts, with workers running.

What an acknowledged reply promises is that the change is on disk: after each restart every
acknowledged define is still there, every acknowledged submission still exists, and every job
ends final once the workers have re-registered and re-sent the results the dead broker missed.
"""

from __future__ import annotations

import threading
import time
import uuid as uuidlib

from tests.faults.conftest import settle
from tests.waiting import wait_until
from virtbroker.client.api import Client
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.common.errors import UnavailableError

DEFINES = 1000
STARTS = 100
KILLS = 4
CLIENT_TIMEOUT_S = 2.0


class Driver(threading.Thread):
    """Runs requests in order, retrying each until the broker acknowledges it.

    A request whose reply never came may or may not have been applied; both retries are
    safe: a define names its UUID (the same name and UUID redefine), and a start carries
    an idempotency key (the broker returns the job it already made).
    """

    def __init__(self, url: str, requests: list, stop: threading.Event):
        super().__init__(daemon=True)
        self.url = url
        self.requests = requests
        self.stop_event = stop
        self.acked: list[dict] = []
        self.retries = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        client = Client(self.url, timeout_s=CLIENT_TIMEOUT_S)
        try:
            for request in self.requests:
                while not self.stop_event.is_set():
                    try:
                        self.acked.append(request(client))
                        break
                    except UnavailableError:
                        # The broker is down or restarting; a fresh socket drops any reply
                        # meant for the request that timed out.
                        self.retries += 1
                        client.close()
                        client = Client(self.url, timeout_s=CLIENT_TIMEOUT_S)
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            client.close()


def test_broker_kill9_during_defines_and_starts(cluster_factory, fault_rng):
    cluster = cluster_factory(lease_ttl_s=2.0)
    cluster.start_broker()
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    cluster.wait_workers(2)

    names = [f"bk{i:04d}" for i in range(DEFINES)]
    uuids = {name: str(uuidlib.UUID(int=fault_rng.getrandbits(128), version=4)) for name in names}
    defines = [lambda c, n=n: c.define(minimal_domain_xml(n, uuid=uuids[n])) for n in names]
    stop = threading.Event()
    definer = Driver(cluster.client_url, defines, stop)

    def start(c, i):
        # Each start follows the acknowledged define of its domain, a few behind it.
        while len(definer.acked) <= i and not stop.is_set():
            time.sleep(0.002)
        return c.submit(names[i], "start", idempotency_key=f"start-{names[i]}")

    starter = Driver(cluster.client_url, [lambda c, i=i: start(c, i) for i in range(STARTS)], stop)

    # Kill points, as counts of acknowledged defines: half while the starts are still being
    # submitted and run, half among the later defines.
    kill_points = sorted(fault_rng.sample(range(10, 2 * STARTS), KILLS // 2)
                         + fault_rng.sample(range(2 * STARTS, DEFINES - 10), KILLS - KILLS // 2))
    print(f"broker kill -9 after {kill_points} acknowledged defines")
    definer.start()
    starter.start()
    kills = 0
    try:
        for point in kill_points:
            wait_until(lambda point=point: len(definer.acked) >= point or not definer.is_alive(), 120,
                       interval_s=0.002, what="defines making progress")
            cluster.broker.kill9()
            kills += 1
            time.sleep(fault_rng.uniform(0.0, 0.5))
            cluster.start_broker()
        definer.join(180)
        starter.join(60)
    finally:
        stop.set()
    assert not definer.is_alive() and not starter.is_alive()
    assert definer.error is None and starter.error is None, (definer.error, starter.error)
    assert len(definer.acked) == DEFINES and len(starter.acked) == STARTS

    c = cluster.client(timeout_s=10)
    # No acknowledged define lost: every one is there, with the UUID it was given.
    registry = {d["name"]: d["uuid"] for d in c.list(all=True)}
    assert registry == uuids, f"seed {fault_rng.seed_value}: {len(set(uuids) - set(registry))} defines lost"
    # No acknowledged submission lost, and none duplicated by a retry.
    job_ids = sorted({j["job_id"] for j in starter.acked})
    assert len(job_ids) == STARTS
    jobs = settle(c, timeout_s=60)
    by_id = {j["job_id"]: j for j in jobs}
    assert all(job_id in by_id for job_id in job_ids)
    starts_per_domain: dict[str, int] = {}
    for j in jobs:
        if j["op"] == "start":
            starts_per_domain[j["domain"]] = starts_per_domain.get(j["domain"], 0) + 1
    assert starts_per_domain == {n: 1 for n in names[:STARTS]}
    # Every job final; a start is either acknowledged by its worker or lost and reconciled.
    states = {by_id[j]["state"] for j in job_ids}
    assert states <= {"succeeded", "lost"}, [by_id[j] for j in job_ids if by_id[j]["state"] not in ("succeeded", "lost")]
    domains = {d["name"]: d for d in c.list(all=True)}
    for job_id in job_ids:
        job = by_id[job_id]
        if job["state"] == "succeeded":
            assert domains[job["domain"]]["state"] == "running", job
        else:
            reconciles = [j for j in jobs if j["op"] == "reconcile" and j["domain"] == job["domain"]]
            assert reconciles and reconciles[-1]["state"] == "succeeded", (job, reconciles)
    print(
        f"{kills} broker kills; define retries {definer.retries}, start retries {starter.retries}; "
        f"starts: {sum(by_id[j]['state'] == 'succeeded' for j in job_ids)} succeeded, "
        f"{sum(by_id[j]['state'] == 'lost' for j in job_ids)} lost and reconciled"
    )
    # The workers are still serving after all that.
    assert len(cluster.wait_workers(2)) == 2
    destroys = c.wait([c.submit(n, "destroy")["job_id"] for n, d in domains.items() if d["state"] != "shutoff"], 60)
    assert {j["state"] for j in destroys} <= {"succeeded"}
