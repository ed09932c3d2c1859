"""The host paths a domain definition makes its guest open, for the security drivers to label."""

from dataclasses import dataclass

from lxml import etree

from virtbroker.common import domxml
from virtbroker.common.errors import InvalidError

# What find_resources honours, exactly:
#
# * Domain level: a <seclabel type='none'> whose model is absent or equals `model` means
#   "label nothing" and the result is []. A domain-level relabel='no' (type static or
#   dynamic) is NOT honoured: domxml.with_static_dac_label() adds exactly that to every
#   definition virtbroker hands to libvirt, to tell libvirt that virtbroker labels.
# * Per source: <seclabel relabel='no'/> inside a <source>, model absent or equal to
#   `model`, skips that source. On a disk's own <source> it skips the whole disk with its
#   backing chain (libvirt's DAC driver lets the chain top's seclabel decide for the
#   chain); on a <backingStore>'s source, that layer only; also honoured on nvram and
#   chardev sources. labelskip is status-only output of libvirt and is ignored.
# * Listed: disk sources (file=, dev=, dir=) and every file/block/dir <backingStore> below
#   them (read-only); cdroms (read-only, empty ones skipped), floppies (read-only, as asked
#   by the design), <readonly/> disks, <shareable/> disks (shared=True); os kernel, initrd,
#   dtb, ACPI tables (read-only); loader (read-only unless readonly='no'); nvram (text or
#   type='file'/'block' source, read-write); serial/console/channel/parallel of type file,
#   unix or dev (read-write; a unix socket in mode='bind' is created by QEMU, so it is
#   marked may_be_absent); <filesystem> sources of type mount/file/block; TPM passthrough
#   devices, nvdimm backing files and passthrough evdev inputs (read-write).
# * Not listed: network and volume (pool) disks and nvram, nvme and vhostuser disks,
#   chardev <log> files (virtlogd writes them, not QEMU), pipe chardevs, hostdevs (sysfs
#   and /dev/vfio), vhost-user sockets of interfaces, virtiofsd binaries, swtpm state.
# * Paths are returned as written (no symlink resolution: that is the drivers' job) and
#   must be absolute: a relative path raises InvalidError. Empty paths count as absent.
# * De-duplicated by path, in first-seen order: read-write wins over read-only (the kind
#   of the read-write use is kept), shared if any use is shared.

_CHARDEV_TAGS = ("serial", "console", "channel", "parallel")
_DISK_SOURCE_ATTR = {"file": "file", "block": "dev", "dir": "dir"}
_FS_SOURCE_ATTR = {"mount": "dir", "file": "file", "block": "dev"}


@dataclass(frozen=True)
class Resource:
    """One host path a guest uses, and how."""

    path: str
    readonly: bool
    shared: bool
    kind: str
    # True for a path QEMU creates itself at start (a listening unix socket): a driver
    # may find it absent and must not fail for that.
    may_be_absent: bool = False


def _root(xml_or_root: str | bytes | etree._Element) -> etree._Element:
    if isinstance(xml_or_root, (str, bytes)):
        return domxml.parse(xml_or_root)
    return xml_or_root


def _applies(seclabel: etree._Element, model: str) -> bool:
    return seclabel.get("model") in (None, model)


def _relabel_off(source: etree._Element | None, model: str) -> bool:
    """True when a per-source <seclabel relabel='no'/> for this model says: leave it alone."""
    if source is None:
        return False
    return any(_applies(s, model) and s.get("relabel") == "no" for s in source.findall("seclabel"))


def _text(el: etree._Element | None) -> str:
    return (el.text or "").strip() if el is not None else ""


class _Collector:
    """Keeps resources in first-seen order, merged per path."""

    def __init__(self) -> None:
        self.by_path: dict[str, Resource] = {}

    def add(
        self, path: str | None, kind: str, readonly: bool, shared: bool = False, may_be_absent: bool = False
    ) -> None:
        if not path:
            return
        if not path.startswith("/"):
            raise InvalidError(f"{kind} path {path!r} is not absolute")
        new = Resource(path, readonly, shared, kind, may_be_absent)
        old = self.by_path.get(path)
        if old is None:
            self.by_path[path] = new
            return
        keep = new if (old.readonly and not new.readonly) else old
        self.by_path[path] = Resource(
            path,
            old.readonly and new.readonly,
            old.shared or new.shared,
            keep.kind,
            old.may_be_absent and new.may_be_absent,
        )


def _add_backing_chain(parent: etree._Element, out: _Collector, model: str) -> None:
    # Backing stores nest: <disk><backingStore><backingStore>...; an empty <backingStore/>
    # ends the chain. Network layers have no host path but may sit above local ones.
    store = parent.find("backingStore")
    while store is not None:
        source = store.find("source")
        attr = _DISK_SOURCE_ATTR.get(store.get("type", ""))
        if attr and source is not None and not _relabel_off(source, model):
            out.add(source.get(attr), "backing", readonly=True)
        store = store.find("backingStore")


def _add_disks(devices: etree._Element, out: _Collector, model: str) -> None:
    for disk in devices.findall("disk"):
        device = disk.get("device", "disk")
        kind = device if device in ("cdrom", "floppy") else "disk"
        readonly = disk.find("readonly") is not None or kind in ("cdrom", "floppy")
        shared = disk.find("shareable") is not None
        # libvirt's default disk type is 'file'.
        attr = _DISK_SOURCE_ATTR.get(disk.get("type", "file"))
        source = disk.find("source")
        if _relabel_off(source, model):
            continue
        if attr and source is not None:
            out.add(source.get(attr), kind, readonly, shared)
        _add_backing_chain(disk, out, model)


def _add_os(os_el: etree._Element, out: _Collector, model: str) -> None:
    for tag in ("kernel", "initrd", "dtb"):
        out.add(_text(os_el.find(tag)), tag, readonly=True)
    for table in os_el.findall("acpi/table"):
        out.add(_text(table), "acpi", readonly=True)
    loader = os_el.find("loader")
    if loader is not None:
        out.add(_text(loader), "loader", readonly=loader.get("readonly") != "no")
    nvram = os_el.find("nvram")
    if nvram is not None:
        nvram_type = nvram.get("type")
        source = nvram.find("source")
        if nvram_type is None:
            out.add(_text(nvram), "nvram", readonly=False)
        elif nvram_type in ("file", "block") and source is not None and not _relabel_off(source, model):
            out.add(source.get("file" if nvram_type == "file" else "dev"), "nvram", readonly=False)


def _add_chardevs(devices: etree._Element, out: _Collector, model: str) -> None:
    for chardev in devices:
        if chardev.tag not in _CHARDEV_TAGS:
            continue
        chardev_type = chardev.get("type")
        if chardev_type not in ("file", "unix", "dev"):
            continue
        # A chardev may carry several <source> elements (libvirt's udp has two); the
        # path-bearing one is the first with a path attribute.
        for source in chardev.findall("source"):
            if source.get("path") and not _relabel_off(source, model):
                listening = chardev_type == "unix" and source.get("mode") == "bind"
                out.add(source.get("path"), chardev.tag, readonly=False, may_be_absent=listening)
                break


def _add_filesystems(devices: etree._Element, out: _Collector) -> None:
    for fs in devices.findall("filesystem"):
        attr = _FS_SOURCE_ATTR.get(fs.get("type", "mount"))
        source = fs.find("source")
        if attr and source is not None:
            out.add(source.get(attr), "filesystem", readonly=fs.find("readonly") is not None)


def _add_other_devices(devices: etree._Element, out: _Collector) -> None:
    for device in devices.findall("tpm/backend[@type='passthrough']/device"):
        out.add(device.get("path"), "tpm", readonly=False)
    for memory in devices.findall("memory[@model='nvdimm']"):
        out.add(_text(memory.find("source/path")), "nvdimm", readonly=False)
    for source in devices.findall("input[@type='passthrough']/source"):
        out.add(source.get("evdev"), "input", readonly=False)


def find_resources(xml_or_root: str | bytes | etree._Element, model: str = "dac") -> list[Resource]:
    """Every host path the guest uses, for security model `model` (see the notes above)."""
    root = _root(xml_or_root)
    for seclabel in root.findall("seclabel"):
        if seclabel.get("type") == "none" and _applies(seclabel, model):
            return []
    out = _Collector()
    os_el = root.find("os")
    if os_el is not None:
        _add_os(os_el, out, model)
    devices = root.find("devices")
    if devices is not None:
        _add_disks(devices, out, model)
        _add_chardevs(devices, out, model)
        _add_filesystems(devices, out)
        _add_other_devices(devices, out)
    return list(out.by_path.values())


def emulator_path(xml_or_root: str | bytes | etree._Element) -> str | None:
    """The <emulator> binary, or None when the definition names none."""
    return _text(_root(xml_or_root).find("devices/emulator")) or None
