"""Failover on etcd: the broker's store in an etcd cluster, and the campaign for its lead.

Any number of brokers share one etcd store. One leads: it holds the leader key under an etcd
lease of leader_ttl_s, renewed every third of it, and every transaction it writes compares
the key's create revision (its fencing token), so a broker that lost the lead, however
paused it was, writes nothing. The others stand by: they answer clients with `not-leader`
naming the leader, tell workers where to go, and campaign as soon as the key goes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import zmq

from virtbroker.broker.etcd_store import CompactedError, EtcdBackend, FencedError, records_from
from virtbroker.broker.registry import DomainRecord
from virtbroker.broker.scheduler import Job
from virtbroker.broker.store import Batch, Store
from virtbroker.common.config import Config, etcd_endpoints
from virtbroker.common.errors import UnavailableError, VirtbrokerError

log = logging.getLogger("virtbroker.ha")

__all__ = ["Campaign", "EtcdStore", "FencedError", "Follower", "broker_info"]


def broker_info(config: Config) -> dict:
    """What the leader key says of its broker: where clients and workers find it."""
    return {
        "broker_id": f"{socket.gethostname()}/{os.getpid()}",
        "client_url": config.client_url,
        "local_url": config.local_url,
        "worker_url": config.worker_url,
        "events_url": config.events_url,
        "readonly_url": config.readonly_url,
    }


class EtcdStore(Store):
    """The broker's Store (the same dirty marking and batches) over etcd: read at takeover,
    written by the store writer under this broker's fence."""

    def __init__(self, backend: EtcdBackend, fence: tuple[str, int], store_url: str, copy: dict | None = None):
        """copy: a standby's raw copy of every key (Follower), current up to the fence's
        revision; the state is built from it instead of read from etcd again."""
        self._clear()
        self.backend = backend
        self.fence = fence
        self.path = store_url
        self.copy = records_from(copy) if copy is not None else None

    def load_domains(self) -> list[DomainRecord]:
        return self.copy[0] if self.copy is not None else self.backend.load_domains()

    def load_jobs(self) -> list[Job]:
        return self.copy[1] if self.copy is not None else self.backend.load_jobs()

    def meta(self, key: str, default: str | None = None) -> str | None:
        if self.copy is not None:
            return self.copy[2].get(key, default)
        return self.backend.meta(key, default)

    def events_since(self, since: int, limit: int) -> list[tuple[int, bytes]]:
        return self.backend.load_events(since)[:limit]

    def oldest_event(self) -> int | None:
        return self.backend.oldest_event()

    def open_writer(self) -> _EtcdWriter:  # a StoreWriterConnection
        return _EtcdWriter(self.backend.endpoints, self.backend.prefix, self.backend.request_timeout_s, self.fence)

    def commit(self) -> None:
        batch = self.take_batch()
        if batch is not None:
            self.backend.write_batches([batch], self.fence)

    def close(self) -> None:
        self.backend.close()


class _EtcdWriter:
    """The store writer's own connection to etcd; every transaction carries the fence."""

    def __init__(self, endpoints: list[str], prefix: str, timeout_s: float, fence: tuple[str, int]):
        self.backend = EtcdBackend(endpoints, prefix, timeout_s)
        self.fence = fence

    def write(self, batches: list[Batch]) -> int:
        return self.backend.write_batches(batches, self.fence)

    def close(self) -> None:
        self.backend.close()


class Follower:
    """A standby's raw copy of the store, kept current by an etcd watch from a snapshot's
    revision, so that taking over builds the state from memory instead of reading every
    key again (100,000 domains are megabytes). On a compacted revision or a lost watch it
    starts again from a new snapshot."""

    def __init__(self, config: Config):
        self.backend = EtcdBackend(etcd_endpoints(config.store), config.etcd_prefix, config.store_timeout_s)
        self.lock = threading.Lock()
        self.raw: dict[str, bytes] = {}
        self.revision = 0  # every change up to this revision is in raw
        self.caught_up = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="follower", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            watch = None
            try:
                raw, revision = self.backend.snapshot()
                with self.lock:
                    self.raw, self.revision = raw, revision
                    self.caught_up.notify_all()
                watch = self.backend.watch(revision + 1)
                while not self.stopping.is_set():
                    changes = watch.get(0.2)
                    if not changes:
                        continue
                    with self.lock:
                        for change in changes:
                            if change.deleted:
                                self.raw.pop(change.key, None)
                            else:
                                self.raw[change.key] = change.value
                            self.revision = max(self.revision, change.revision)
                        self.caught_up.notify_all()
            except (CompactedError, UnavailableError, VirtbrokerError) as e:
                log.info("following the store again from a new snapshot: %s", e)
                self.stopping.wait(0.5)
            except Exception:
                log.exception("following the store failed; starting again")
                self.stopping.wait(0.5)
            finally:
                if watch is not None:
                    watch.close()

    def copy_at(self, revision: int, timeout_s: float) -> dict[str, bytes] | None:
        """The raw copy once it holds every change up to `revision` (our own election's: every
        write of the leader before us is older), or None if it does not get there in time."""
        with self.lock:
            if not self.caught_up.wait_for(lambda: self.revision >= revision, timeout_s):
                return None
            return dict(self.raw)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=2.0)
        self.backend.close()


class Campaign:
    """A thread that campaigns for the lead, keeps the lease alive while leading, and tells
    the broker's loop what changed, on an inproc PAIR socket the loop polls:

    - [b"leader", token, info]: this broker leads under `token`;
    - [b"follower", info]: another broker leads (its leader key's value, JSON), or b"" if none;
    - [b"lost", reason]: this broker's lease could not be renewed within its TTL (or etcd says
      it expired): it must stop acknowledging at once and stand by.
    """

    _instances = 0

    def __init__(self, config: Config, context: zmq.Context):
        Campaign._instances += 1
        self.url = f"inproc://campaign-{Campaign._instances}"
        self.config = config
        self.ttl_s = config.leader_ttl_s
        self.value = json.dumps(broker_info(config)).encode()
        self.backend = EtcdBackend(etcd_endpoints(config.store), config.etcd_prefix, config.store_timeout_s)
        self.loop_side = context.socket(zmq.PAIR)
        self.loop_side.setsockopt(zmq.LINGER, 0)
        self.loop_side.bind(self.url)
        self._out = context.socket(zmq.PAIR)
        self._out.setsockopt(zmq.LINGER, 0)
        self._out.connect(self.url)
        self.stopping = threading.Event()
        self.resign_now = threading.Event()  # the loop gave up the lead (a write failed): let it go
        self.resigned = threading.Event()
        self.thread = threading.Thread(target=self._run, name="campaign", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        last_said = None
        while not self.stopping.is_set():
            try:
                current = self.backend.leader()
                if current is None:
                    leadership = self.backend.campaign(self.value, self.ttl_s)
                    if leadership is not None:
                        self._lead(leadership)
                        last_said = None
                        continue
                    current = self.backend.leader()
                said = current[0] if current else b""
                if said != last_said:
                    self._out.send_multipart([b"follower", said])
                    last_said = said
                if current is not None:
                    # Campaign as soon as the leader key goes (resigned, or its lease expired).
                    self.backend.wait_for_leader_change(current[1], timeout_s=self.ttl_s)
                else:
                    self.stopping.wait(0.1)  # no leader and we lost the race: look again soon
            except (UnavailableError, VirtbrokerError) as e:
                if last_said != b"":
                    log.warning("cannot reach etcd to follow or campaign: %s", e)
                    self._out.send_multipart([b"follower", b""])
                    last_said = b""
                self.stopping.wait(min(0.5, self.ttl_s / 4))
            except Exception:
                log.exception("campaign failed; trying again")
                self.stopping.wait(0.5)

    def _lead(self, leadership) -> None:
        """Lead until the lease cannot be renewed within its TTL, the loop resigns, or we stop."""
        self.resign_now.clear()  # a resign asked of an earlier term is not for this one
        self._out.send_multipart([b"leader", str(leadership.token).encode(), self.value])
        renewed_at = time.monotonic()
        interval_s = self.ttl_s / 3
        while not self.stopping.wait(interval_s):
            if self.resign_now.is_set():
                # The loop stood down (its store refused a write): hand the lead over now, so
                # that a new election (this broker too, reloading) happens at once.
                self.resign_now.clear()
                leadership.resign()
                return
            if leadership.keepalive():
                renewed_at = time.monotonic()
                continue
            if time.monotonic() - renewed_at >= self.ttl_s - interval_s:
                # Renewals failed for about a TTL: etcd may already have let the key go.
                self._out.send_multipart([b"lost", b"the leader lease could not be renewed within its TTL"])
                return
        leadership.resign()  # a clean stop hands over at once
        self.resigned.set()

    def resign(self) -> None:
        """From the loop: stop leading (the campaign thread lets the key go, then campaigns again)."""
        self.resign_now.set()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=self.config.store_timeout_s * 2 + 1)
        self._out.close(linger=0)
        self.loop_side.close(linger=0)
        self.backend.close()
