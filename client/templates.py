"""Small domain definitions for demos, tests and benchmarks."""

from __future__ import annotations

import os
from xml.sax.saxutils import escape


def kvm_available() -> bool:
    return os.path.exists("/dev/kvm")


def minimal_domain_xml(
    name: str,
    domain_type: str = "test",
    memory_mib: int = 64,
    uuid: str | None = None,
    disks: list[str] | None = None,
    extra_devices: str = "",
) -> str:
    """A one-vCPU guest with no disk (or the given qcow2/raw files): boots to firmware and keeps running.

    domain_type 'test' is for libvirt's test driver; 'kvm' (or 'qemu' without /dev/kvm) for QEMU.
    """
    uuid_el = f"<uuid>{uuid}</uuid>" if uuid else ""
    if domain_type == "test":
        os_el = "<os><type>hvm</type></os>"
    else:
        os_el = "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>"
    disk_els = ""
    for index, path in enumerate(disks or []):
        fmt = "qcow2" if path.endswith(".qcow2") else "raw"
        disk_els += (
            f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
            f"<source file='{escape(path)}'/><target dev='vd{chr(ord('a') + index)}' bus='virtio'/></disk>"
        )
    devices = ""
    if domain_type != "test":
        devices = (
            "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>"
            f"{disk_els}{extra_devices}<video><model type='none'/></video>"
            "<memballoon model='none'/></devices>"
        )
    return (
        f"<domain type='{domain_type}'><name>{escape(name)}</name>{uuid_el}"
        f"<memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>{os_el}"
        f"<on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>"
        f"{devices}</domain>"
    )
