"""The domain registry: UUID -> record and name -> UUID, with libvirt's define rules."""

from __future__ import annotations

from dataclasses import dataclass, field

from virtbroker.common.domxml import Definition, is_ha, looks_like_uuid, normalize_uuid
from virtbroker.common.errors import ConflictError, InvalidError, NotFoundError


@dataclass
class DomainRecord:
    uuid: str
    name: str
    xml: str  # the persistent definition: what the next start uses
    state: str = "shutoff"  # shutoff, running, paused; unknown while its host is unreachable
    host_id: str | None = None  # where it runs (or last ran under a lease)
    epoch: int = 0  # grows with every lease granted for this domain
    generation: int = 1  # grows with every redefine
    live_xml: str | None = None  # the definition the running guest was started from
    changed_at: float = 0.0  # monotonic time of the last state change (not stored)
    # The last accepted job result: its host, and when its libvirt work ended by that host's
    # monotonic clock (not stored). A libvirt event read before then is stale.
    settled_host: str | None = None
    settled_at: float = 0.0
    # (the definition text it was read from, whether that text marks the domain HA): every
    # renewal asks whether its host runs HA guests, and a definition is parsed once, not
    # per renewal (domxml.is_ha's own cache holds a few thousand definitions).
    _ha: tuple[str, bool] | None = field(default=None, repr=False, compare=False)

    @property
    def ha(self) -> bool:
        """Does the definition mark the domain HA (restarted elsewhere once its host is fenced)?"""
        if self._ha is None or self._ha[0] is not self.xml:
            self._ha = (self.xml, is_ha(self.xml))
        return self._ha[1]

    def summary(self) -> dict:
        return {
            "uuid": self.uuid,
            "name": self.name,
            "state": self.state,
            "host": self.host_id,
            "generation": self.generation,
            "epoch": self.epoch,
        }


class Registry:
    """Owned by the broker loop alone, so it needs no lock."""

    def __init__(self):
        self.by_uuid: dict[str, DomainRecord] = {}
        self.by_name: dict[str, str] = {}
        # Kept as records change, so metrics never walk 100,000 records.
        self.state_counts: dict[str, int] = {"shutoff": 0, "running": 0, "paused": 0}

    def __len__(self) -> int:
        return len(self.by_uuid)

    def add(self, record: DomainRecord) -> None:
        self.by_uuid[record.uuid] = record
        self.by_name[record.name] = record.uuid
        self.state_counts[record.state] = self.state_counts.get(record.state, 0) + 1

    def set_state(self, record: DomainRecord, state: str) -> None:
        self.state_counts[record.state] -= 1
        self.state_counts[state] = self.state_counts.get(state, 0) + 1
        record.state = state

    def resolve(self, ref: str) -> DomainRecord:
        """A domain by name or UUID (names win, as virsh tries the name first)."""
        uuid = self.by_name.get(ref)
        if uuid is not None:
            return self.by_uuid[uuid]
        if looks_like_uuid(ref):
            record = self.by_uuid.get(normalize_uuid(ref))
            if record is not None:
                return record
        raise NotFoundError(f"Domain not found: no domain with matching name or uuid '{ref}'")

    def define(self, definition: Definition) -> tuple[DomainRecord, bool]:
        """Apply a definition; returns (record, created). libvirt's rules:

        - a name already used by another UUID is refused, naming that UUID;
        - a UUID already used under another name is refused (libvirt has no rename by define);
        - the same name and UUID redefines; a running guest keeps its live definition and
          the new one applies at its next start.
        """
        by_name = self.by_name.get(definition.name)
        if by_name is not None and by_name != definition.uuid:
            raise ConflictError(f"domain '{definition.name}' already exists with uuid {by_name}")
        existing = self.by_uuid.get(definition.uuid)
        if existing is not None and existing.name != definition.name:
            raise ConflictError(
                f"domain '{existing.name}' is already defined with uuid {definition.uuid}"
            )
        if existing is not None:
            existing.xml = definition.xml
            existing.generation += 1
            return existing, False
        record = DomainRecord(uuid=definition.uuid, name=definition.name, xml=definition.xml)
        self.add(record)
        return record, True

    def remove(self, uuid: str) -> DomainRecord:
        record = self.by_uuid.pop(uuid)
        self.by_name.pop(record.name, None)
        self.state_counts[record.state] -= 1
        return record

    def list(self, include_inactive: bool = False, state: str | None = None) -> list[DomainRecord]:
        if state is not None and state not in ("running", "paused", "shutoff", "unknown", "active", "inactive"):
            raise InvalidError(f"unknown state filter '{state}' (running, paused, shutoff, unknown, active, inactive)")
        out = []
        for record in self.by_uuid.values():
            active = record.state != "shutoff"
            if state == "active" and not active or state == "inactive" and active:
                continue
            if state in ("running", "paused", "shutoff", "unknown") and record.state != state:
                continue
            if state is None and not include_inactive and not active:
                continue
            out.append(record)
        out.sort(key=lambda r: r.name)
        return out
