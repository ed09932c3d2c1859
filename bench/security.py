"""Section 4: start storms of guests on qcow2 overlays of one shared base, QEMU as an unprivileged user:
libvirt's own DAC labelling against virtbroker's security workers (none, dac, dac+apparmor; per-resource or global)."""

from __future__ import annotations

import datetime
import importlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import libvirt

from bench.common import (
    PREFIX,
    SETTLE_S,
    Settings,
    cleanup_guests,
    connections,
    guest_xml,
    median,
    parallel,
    ratio,
    say,
    vb_client,
    vb_cluster,
    vb_start_destroy,
)
from virtbroker.common import domxml
from virtbroker.common.resources import Resource

GUEST_USER = "vbguest"
VB_WORKERS = 4
IMAGE_SIZE = "64M"
LABEL_THREADS = 8  # the security worker's default pool (security_slots)
BASELINE_LIBVIRT = "libvirt-dac"
BASELINE_NONE = "virtbroker-none"
# "2026-11-25 22:57:21,558 INFO MainProcess virtbroker.security: dac label vbb-x00: ok in 12.3 ms"
_LABEL_LOG_RE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ \S+ virtbroker\.security: (\w+) label (\S+): ok in ([\d.]+) ms"
)


def guest_ids() -> tuple[int, int]:
    pw = pwd.getpwnam(GUEST_USER)
    return pw.pw_uid, pw.pw_gid


def owner(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid


class Images:
    """A storage root under /var/tmp with base.qcow2 and one overlay per guest, all root:root 0600."""

    def __init__(self, n: int):
        self.root = Path(tempfile.mkdtemp(prefix="vbb-sec-", dir="/var/tmp"))
        self.root.chmod(0o711)  # QEMU, as the guest user, must be able to traverse it
        self.base = self.root / "base.qcow2"
        self._create(self.base)
        self.overlays = [self.root / f"overlay{i:02d}.qcow2" for i in range(n)]
        for overlay in self.overlays:
            self._create(overlay, backing=self.base)

    @staticmethod
    def _create(path: Path, backing: Path | None = None) -> None:
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if backing is not None:
            cmd += ["-b", str(backing), "-F", "qcow2"]
        subprocess.run(cmd + [str(path), IMAGE_SIZE], check=True)
        os.chown(path, 0, 0)
        path.chmod(0o600)

    def chown_all(self, uid: int, gid: int) -> None:
        for path in [self.base, *self.overlays]:
            os.chown(path, uid, gid)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _names(n: int) -> list[str]:
    return [f"{PREFIX}sec{i:02d}" for i in range(n)]


# ---------------------------------------------------------------------------- libvirt labels
def libvirt_dac(conn: libvirt.virConnect, n: int) -> dict:
    """libvirt's DAC driver labels for the guest user itself: a static label with relabel='yes'
    (remember_owner is on by default), one thread per guest. qemu.conf stays untouched."""
    uid, gid = guest_ids()
    images = Images(n)
    names = _names(n)
    seclabel = f"<seclabel type='static' model='dac' relabel='yes'><label>+{uid}:+{gid}</label></seclabel>"
    xml = {
        name: guest_xml(name, disks=[str(o)]).replace("</domain>", seclabel + "</domain>")
        for name, o in zip(names, images.overlays)
    }
    try:
        with connections(n) as own:
            conn_of = dict(zip(names, own))
            started = time.monotonic()
            parallel(lambda name: conn_of[name].defineXML(xml[name]).create(), names)
            start_s = time.monotonic() - started
            started = time.monotonic()
            parallel(lambda name: conn_of[name].lookupByName(name).destroy(), names)
            destroy_s = time.monotonic() - started
        return {
            "start_s": start_s,
            "destroy_s": destroy_s,
            "base_restored": owner(images.base) == (0, 0),
            "base_owner_after": list(owner(images.base)),
            "overlays_restored": all(owner(o) == (0, 0) for o in images.overlays),
        }
    finally:
        cleanup_guests(conn)
        images.remove()


# ---------------------------------------------------------------------------- virtbroker labels
def _cluster_args(drivers: list[str], root: Path, serialization: str) -> list[str]:
    if not drivers:
        return []
    return [
        "--security", ",".join(drivers), "--guest-user", GUEST_USER,
        "--storage-root", str(root), "--serialization", serialization,
    ]


def labelling_span_s(log_text: str, names: set[str]) -> tuple[float | None, list[float]]:
    """Wall time from the first label request's start to the last one's end, from a security worker's log."""
    spans = []
    durations_ms = []
    for line in log_text.splitlines():
        m = _LABEL_LOG_RE.match(line)
        if not m or m.group(3) not in names:
            continue
        end = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        duration_ms = float(m.group(4))
        spans.append((end - duration_ms / 1000.0, end))
        durations_ms.append(duration_ms)
    if not spans:
        return None, []
    return max(e for _, e in spans) - min(s for s, _ in spans), durations_ms


def vb_security(conn: libvirt.virConnect, n: int, drivers: list[str], serialization: str) -> dict:
    uid, gid = guest_ids()
    images = Images(n)
    names = _names(n)
    if drivers:
        xml = {name: guest_xml(name, disks=[str(o)]) for name, o in zip(names, images.overlays)}
    else:
        # No labelling at all: the files already belong to the guest user, and libvirt is
        # told to run QEMU as that user and relabel nothing (HOST.md item 10).
        images.chown_all(uid, gid)
        xml = {
            name: domxml.with_static_dac_label(guest_xml(name, disks=[str(o)]), uid, gid)
            for name, o in zip(names, images.overlays)
        }
    slots = -(-n // VB_WORKERS)
    try:
        with vb_cluster(
            VB_WORKERS, slots, extra=_cluster_args(drivers, images.root, serialization), security_drivers=drivers
        ) as cluster:
            start_s, destroy_s = vb_start_destroy(cluster, xml)
            c = vb_client(cluster)
            out = {"start_s": start_s, "destroy_s": destroy_s}
            if drivers:
                out["base_restored"] = owner(images.base) == (0, 0)
                out["base_owner_after"] = list(owner(images.base))
                out["overlays_restored"] = all(owner(o) == (0, 0) for o in images.overlays)
                for driver in drivers:
                    span_s, durations_ms = labelling_span_s(cluster.security[driver].log(), set(names))
                    out[f"{driver}_label_span_s"] = span_s
                    out[f"{driver}_label_median_ms"] = median(durations_ms)
                out["outside_root_refused"] = _outside_root_refused(c, images)
            return out
    finally:
        cleanup_guests(conn)
        images.remove()


def _outside_root_refused(c, images: Images) -> bool:
    """A disk outside the storage roots must fail to start and keep its owner."""
    outside_dir = Path(tempfile.mkdtemp(prefix="vbb-outside-", dir="/var/tmp"))
    try:
        disk = outside_dir / "outside.qcow2"
        Images._create(disk)
        name = f"{PREFIX}outside"
        c.define(guest_xml(name, disks=[str(disk)]))
        job = c.run(name, "start", 120)
        refused = job["state"] == "failed" and owner(disk) == (0, 0)
        if job["state"] == "succeeded":
            c.run(name, "destroy", 120)
        return refused
    finally:
        shutil.rmtree(outside_dir, ignore_errors=True)


# ---------------------------------------------------------------------------- the driver alone
def driver_labelling(n: int, serialization: str) -> float:
    """The labelling part alone: DacDriver.label() for n domains from LABEL_THREADS threads, in process.

    Each domain has its overlay (read-write) and the shared base (read-only), exactly the
    resources the security worker hands the driver; no qemu-img probing, no messaging.
    """
    from virtbroker.workers.security.dac import DacDriver

    uid, gid = guest_ids()
    images = Images(n)
    state_dir = Path(tempfile.mkdtemp(prefix="vbb-dac-", dir="/var/tmp"))
    try:
        driver = DacDriver(state_dir, uid, gid, [str(images.root)], serialization)
        work = [
            (f"00000000-0000-4000-8000-{i:012d}", [
                Resource(str(overlay), readonly=False, shared=False, kind="disk"),
                Resource(str(images.base), readonly=True, shared=True, kind="backing"),
            ])
            for i, overlay in enumerate(images.overlays)
        ]
        lock = threading.Lock()

        def worker():
            while True:
                with lock:
                    if not work:
                        return
                    dom, resources = work.pop()
                driver.label(dom, resources)

        threads = [threading.Thread(target=worker) for _ in range(LABEL_THREADS)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed_s = time.monotonic() - started
        for i in range(n):
            driver.restore(f"00000000-0000-4000-8000-{i:012d}")
        if owner(images.base) != (0, 0):
            raise RuntimeError("the DAC driver did not restore the shared base")
        return elapsed_s
    finally:
        images.remove()
        shutil.rmtree(state_dir, ignore_errors=True)


# ---------------------------------------------------------------------------- the section
def configs(settings: Settings) -> list[tuple[str, list[str] | None, str]]:
    """(way, virtbroker drivers or None for libvirt, serialization)."""
    out = [
        (BASELINE_LIBVIRT, None, ""),
        (BASELINE_NONE, [], "per-resource"),
        ("virtbroker-dac", ["dac"], "per-resource"),
        ("virtbroker-dac+apparmor", ["dac", "apparmor"], "per-resource"),
    ]
    if not settings.short:
        out += [
            ("virtbroker-dac-global", ["dac"], "global"),
            ("virtbroker-dac+apparmor-global", ["dac", "apparmor"], "global"),
        ]
    return out


def not_runnable() -> str | None:
    """Why the section cannot run here, or None."""
    try:
        guest_ids()
    except KeyError:
        return f"guest user {GUEST_USER} does not exist"
    if shutil.which("qemu-img") is None:
        return "qemu-img is not installed"
    try:
        importlib.import_module("virtbroker.workers.security.service")  # the security worker must import
    except Exception as e:
        return f"the security worker service does not import: {e}"
    return None


def run(settings: Settings, conn: libvirt.virConnect) -> dict:
    reason = not_runnable()
    if reason:
        return {"status": f"not run: {reason}"}
    n = settings.security_n
    rows: dict[str, dict] = {}
    for rep in range(settings.security_reps):
        for way, drivers, serialization in configs(settings):
            row = rows.setdefault(
                way, {"n": n, "way": way, "drivers": drivers, "serialization": serialization, "reps": [], "errors": []}
            )
            say(f"security rep {rep + 1}/{settings.security_reps}: N={n} {way}")
            try:
                result = libvirt_dac(conn, n) if drivers is None else vb_security(conn, n, drivers, serialization)
            except Exception as e:
                say(f"  failed: {e}")
                row["errors"].append(str(e)[:500])
                continue
            row["reps"].append(result)
            say(f"  start {result['start_s']:.2f} s, destroy {result['destroy_s']:.2f} s"
                + (f", dac labelling {result['dac_label_span_s']:.2f} s" if result.get("dac_label_span_s") else ""))
            time.sleep(SETTLE_S)
    driver_rows = []
    for serialization in ("per-resource", "global"):
        say(f"security: DAC driver alone, {serialization}")
        times = [driver_labelling(n, serialization) for _ in range(settings.reps)]
        driver_rows.append({"n": n, "serialization": serialization, "label_s": median(times), "label_s_reps": times})
    out_rows = []
    for row in rows.values():
        reps = row["reps"]
        for key in ("start_s", "destroy_s", "dac_label_span_s", "apparmor_label_span_s", "dac_label_median_ms"):
            values = [r[key] for r in reps if r.get(key) is not None]
            row[key[: -len("_s")] + "_median_s" if key.endswith("_s") else key] = median(values)
        for key in ("base_restored", "overlays_restored", "outside_root_refused"):
            values = [r[key] for r in reps if key in r]
            row[key] = all(values) if values else None
        row["base_owner_after"] = reps[-1].get("base_owner_after") if reps else None
        out_rows.append(row)
    by_way = {r["way"]: r for r in out_rows}
    for row in out_rows:
        row["start_ratio_libvirt"] = ratio(
            row.get("start_median_s"), by_way.get(BASELINE_LIBVIRT, {}).get("start_median_s")
        )
        row["start_ratio_none"] = ratio(row.get("start_median_s"), by_way.get(BASELINE_NONE, {}).get("start_median_s"))
        row["destroy_ratio_libvirt"] = ratio(
            row.get("destroy_median_s"), by_way.get(BASELINE_LIBVIRT, {}).get("destroy_median_s")
        )
    per_resource, global_ = driver_rows
    return {
        "status": "ok",
        "baseline": f"{BASELINE_LIBVIRT} (libvirt labelling itself) and {BASELINE_NONE} (nothing labelled)",
        "note": (
            f"N={n} guests, each on its own qcow2 overlay of one shared base.qcow2 (root:root 0600, "
            f"under /var/tmp), QEMU as {GUEST_USER}. libvirt-dac: a per-domain static DAC seclabel "
            "with relabel='yes' (libvirt labels and, with remember_owner, restores), one thread and "
            "connection per guest. virtbroker: 4 lifecycle workers and one security worker per driver. "
            "The labelling span is read from the security worker's log (first label start to last "
            f"label end); the driver-alone row labels the same files from {LABEL_THREADS} threads "
            "in one process."
        ),
        "rows": out_rows,
        "driver": driver_rows,
        "driver_speedup": ratio(global_["label_s"], per_resource["label_s"]),
    }
