"""Events replay: a subscriber that was away reads every event since the last seq it saw,
in order and once each, then goes on live; across a broker kill -9 too; and a seq older
than the kept history gets `gone`, not a silent gap."""

from __future__ import annotations

import threading

import pytest

from tests.waiting import wait_until
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.common import protocol as p
from virtbroker.common.errors import GoneError


def test_replay_then_live_in_order_without_duplicates(cluster_factory):
    cluster = cluster_factory()
    cluster.start_broker()
    cluster.start_worker("w1")
    cluster.wait_workers(1)
    c = cluster.client()
    c.define(minimal_domain_xml("ev-a"))
    c.wait([c.submit("ev-a", "start")["job_id"]], 30)
    replayed = list(c.events(since=0, timeout_s=1))
    seqs = [e.seq for e in replayed]
    assert seqs == list(range(1, len(seqs) + 1)), seqs  # every event, in order, once
    assert {e.KIND for e in replayed} == {"domain", "job"}
    away_at = seqs[-1]
    # While the subscriber is away: more changes, then a kill -9 and restart of the broker.
    c.wait([c.submit("ev-a", "destroy")["job_id"]], 30)
    c.define(minimal_domain_xml("ev-b"))
    cluster.broker.kill9()
    cluster.start_broker()
    cluster.wait_workers(1)
    c2 = cluster.client()
    c2.define(minimal_domain_xml("ev-c"))

    got: list = []
    done = threading.Event()

    def listen():
        for event in c2.events(since=away_at, timeout_s=20):
            got.append(event)
            if event.KIND == "domain" and event.name == "ev-d":
                break
        done.set()

    listener = threading.Thread(target=listen)
    listener.start()
    try:
        wait_until(lambda: any(getattr(e, "name", None) == "ev-c" for e in got), what="replay reached ev-c")
        cluster.client().define(minimal_domain_xml("ev-d"))  # a live one after the replay
        assert done.wait(20)
    finally:
        listener.join(30)
    seqs = [e.seq for e in got]
    assert seqs == list(range(away_at + 1, away_at + 1 + len(seqs))), seqs
    names = [e.name for e in got if e.KIND == "domain" and e.event == "defined"]
    assert names == ["ev-b", "ev-c", "ev-d"]
    assert any(e.KIND == "job" and e.op == "destroy" and e.state == "succeeded" for e in got)


def test_a_seq_older_than_the_history_is_gone(cluster_factory):
    cluster = cluster_factory(extra=["--event-history", "10"])
    cluster.start_broker()
    c = cluster.client()
    for i in range(40):
        c.define(minimal_domain_xml(f"gone-{i}"))
    with pytest.raises(GoneError, match="re-read the state"):
        next(iter(c.events(since=1, timeout_s=1)))
    recent = list(c.events(since=35, timeout_s=0.5))
    assert [e.seq for e in recent] == [36, 37, 38, 39, 40]


def test_an_event_right_after_subscribing_is_never_missed(cluster_factory):
    """The broker builds only events someone subscribed to, and learns of a subscription only
    when its loop reads it: an event committed in between is not published. events(since=)
    reads it from the history until the first live event shows the subscription is in place.
    Each round: a fresh subscriber, then at once one define, the only event."""
    cluster = cluster_factory()
    cluster.start_broker()
    c = cluster.client()
    for i in range(10):
        since = c.call(p.EventsSince, since=0, limit=1)["seq"]  # the newest event so far
        stream = c.events(since=since, timeout_s=10)
        other = cluster.client()
        first = []

        def listen(stream=stream, first=first):
            for event in stream:
                first.append(event)
                return

        listener = threading.Thread(target=listen)
        listener.start()
        other.define(minimal_domain_xml(f"ev-now-{i}"))
        listener.join(15)
        assert first and first[0].KIND == "domain" and first[0].name == f"ev-now-{i}", (i, first)
