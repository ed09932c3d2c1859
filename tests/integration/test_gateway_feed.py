"""The libvirt gateway's event feed against a real broker: it reads the registry and follows
every event after it, none missed and none twice, also right after it starts and across a
broker kill -9."""

from __future__ import annotations

import queue

from tests.waiting import wait_until
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.common import protocol as p
from virtbroker.gateway import rpc
from virtbroker.gateway.events import EventFeed, LifecycleTranslator


def _feed(url: str) -> tuple[EventFeed, queue.Queue]:
    delivered: queue.Queue = queue.Queue()
    feed = EventFeed(url, LifecycleTranslator(), delivered.put, on_stopped=lambda uuid: None)
    feed.start()
    return feed, delivered


def _next(delivered: queue.Queue, timeout_s: float = 10.0):
    try:
        return delivered.get(timeout=timeout_s)
    except queue.Empty:
        return None


def _stop(feed: EventFeed) -> None:
    feed.stopping.set()
    feed.join(10)
    assert not feed.is_alive()


def test_ping_and_list_in_one_batch_agree_on_the_event_seq(cluster_factory):
    """What the feed builds on: the registry and ping's event_seq, read in one turn."""
    cluster = cluster_factory()
    cluster.start_broker()
    c = cluster.client()
    assert c.ping()["event_seq"] == 0
    c.define(minimal_domain_xml("seq-a"))
    c.define(minimal_domain_xml("seq-b"))
    status, listing = c.call_many([p.Ping(request_id=0), p.ListDomains(request_id=0, all=True)])
    assert status["event_seq"] == 2
    assert sorted(d["name"] for d in listing) == ["seq-a", "seq-b"]
    assert [e.seq for e in c.events(since=status["event_seq"], timeout_s=0.5)] == []


def test_an_event_right_after_the_feed_starts_is_delivered_once(cluster_factory):
    """Each round a fresh feed and, as soon as it has read the registry, one define: the only
    event. It must come as DEFINED (the broker may not have read the feed's subscription yet:
    the history covers it), and a domain defined before the feed started must not."""
    cluster = cluster_factory()
    cluster.start_broker()
    c = cluster.client()
    c.define(minimal_domain_xml("feed-before"))
    for i in range(10):
        feed, delivered = _feed(cluster.local_url)
        try:
            assert feed.subscribed.wait(10)
            c.define(minimal_domain_xml(f"feed-now-{i}"))
            got = _next(delivered)
            assert got is not None, f"round {i}: the define's event never came"
            assert (got.name, got.event, got.detail) == (f"feed-now-{i}", rpc.EV_DEFINED, rpc.DETAIL_DEFINED_ADDED)
            assert _next(delivered, 0.7) is None  # once, and nothing for the domains listed
        finally:
            _stop(feed)


def test_the_feed_follows_a_broker_restart(cluster_factory):
    """kill -9 of the broker, a change while the feed reconnects, and one after: both reach
    the feed, the first as a difference from the registry it read before."""
    cluster = cluster_factory()
    cluster.start_broker()
    c = cluster.client()
    c.define(minimal_domain_xml("restart-a"))
    feed, delivered = _feed(cluster.local_url)
    try:
        assert feed.subscribed.wait(10)
        cluster.broker.kill9()
        feed.subscribed.clear()
        cluster.start_broker()
        cluster.client().define(minimal_domain_xml("restart-b"))
        wait_until(feed.subscribed.is_set, timeout_s=20, what="the feed follows the new broker")
        cluster.client().define(minimal_domain_xml("restart-c"))
        names = []
        while len(names) < 2:
            got = _next(delivered, 20)
            assert got is not None, f"only {names} came"
            assert got.event == rpc.EV_DEFINED
            names.append(got.name)
        assert names == ["restart-b", "restart-c"]
        assert _next(delivered, 0.7) is None
    finally:
        _stop(feed)
