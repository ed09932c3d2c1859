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
    Settings,
    cleanup_guests,
    connections,
    guest_xml,
    median,
    parallel,
    say,
    spread,
    vb_client,
    vb_cluster,
    vb_start_destroy,
)
from bench.verdict import HIGHER, LOWER, decide, interleaved, not_measured, pair_order, pair_ratio, pair_ratios
from virtbroker.common import domxml
from virtbroker.common.resources import Resource, emulator_path, find_resources

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
def libvirt_labels(conn: libvirt.virConnect, n: int, relabel: bool = True) -> dict:
    """libvirt-python, one thread and connection per guest, QEMU as the guest user.

    relabel: libvirt's DAC driver labels for the guest user itself (a static label with
    relabel='yes'; remember_owner is on by default) and restores after; otherwise the files
    already belong to the guest user and libvirt relabels nothing (relabel='no'), the same
    start as virtbroker-none's, on libvirtd alone. qemu.conf stays untouched."""
    uid, gid = guest_ids()
    images = Images(n)
    names = _names(n)
    if relabel:
        seclabel = f"<seclabel type='static' model='dac' relabel='yes'><label>+{uid}:+{gid}</label></seclabel>"
        xml = {
            name: guest_xml(name, disks=[str(o)]).replace("</domain>", seclabel + "</domain>")
            for name, o in zip(names, images.overlays)
        }
    else:
        images.chown_all(uid, gid)
        xml = {
            name: domxml.with_static_dac_label(guest_xml(name, disks=[str(o)]), uid, gid)
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
        out = {"start_s": start_s, "destroy_s": destroy_s}
        if relabel:
            out.update({
                "base_restored": owner(images.base) == (0, 0),
                "base_owner_after": list(owner(images.base)),
                "overlays_restored": all(owner(o) == (0, 0) for o in images.overlays),
            })
        return out
    finally:
        cleanup_guests(conn)
        images.remove()


# ---------------------------------------------------------------------------- the host's ceiling
class Profiles:
    """The AppArmor profiles the security worker would compile for n storm guests, rendered
    once by the driver's own render() (the same resources: overlay, backing base, emulator)
    and kept as files, for the ceiling: the same compiles with no virtbroker around them."""

    def __init__(self, n: int):
        from virtbroker.workers.security.apparmor import AppArmorDriver
        from virtbroker.workers.security.service import with_backing_files

        self.dir = Path(tempfile.mkdtemp(prefix="vbb-aa-", dir="/var/tmp"))
        images = Images(n)
        try:
            xml = guest_xml(f"{PREFIX}sec00", disks=[str(images.overlays[0])])
            emulator = emulator_path(xml)
            driver = AppArmorDriver(self.dir / "state", self.dir / "unused", [str(images.root)], [emulator])
            self.paths = []
            for i, (name, overlay) in enumerate(zip(_names(n), images.overlays)):
                xml = guest_xml(name, disks=[str(overlay)])
                resources = with_backing_files(find_resources(xml, model="apparmor"), [str(images.root)])
                path = self.dir / f"profile{i:02d}"
                path.write_text(driver.render(f"00000000-0000-4000-8000-{i:012d}", name, resources, emulator))
                self.paths.append(path)
            self.parser = driver.parser
        finally:
            images.remove()

    def compile(self, path: Path) -> None:
        subprocess.run([self.parser, "-Q", "-K", str(path)], check=True, capture_output=True, timeout=60)

    def ceiling(self, pair_index: int) -> dict:
        """All n compiles one after another and all at once (one thread each): their ratio is
        the most any serialization change can gain on this host's cores right now."""
        times = {}
        for way in pair_order(pair_index, ["serial", "parallel"]):
            started = time.monotonic()
            if way == "serial":
                for path in self.paths:
                    self.compile(path)
            else:
                parallel(self.compile, self.paths)
            times[f"{way}_s"] = time.monotonic() - started
        times["ceiling"] = times["serial_s"] / times["parallel_s"]
        return times

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


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
CEILING = "ceiling: apparmor_parser alone"
BOTH_PR, BOTH_GLOBAL = "virtbroker-dac+apparmor", "virtbroker-dac+apparmor-global"
DAC_PR, DAC_GLOBAL = "virtbroker-dac", "virtbroker-dac-global"
LIBVIRT_NONE = "libvirt-none"


def configs(settings: Settings) -> list[tuple[str, str, list[str] | None, str]]:
    """(way, kind: libvirt, virtbroker or ceiling, drivers, serialization), in an even pair's
    order: every two ways a target compares are next to each other, so they stay next to
    each other when the order flips (the ceiling is a second or so between the two storms
    it is judged with)."""
    out = []
    if not settings.short:
        out.append((LIBVIRT_NONE, "libvirt", None, ""))
    out.append((BASELINE_LIBVIRT, "libvirt", None, ""))
    if not settings.short:  # the short run has time for the storms with both drivers only
        out += [(DAC_PR, "virtbroker", ["dac"], "per-resource"), (DAC_GLOBAL, "virtbroker", ["dac"], "global")]
    out += [
        (BASELINE_NONE, "virtbroker", [], "per-resource"),
        (BOTH_PR, "virtbroker", ["dac", "apparmor"], "per-resource"),
        (CEILING, "ceiling", None, ""),
        (BOTH_GLOBAL, "virtbroker", ["dac", "apparmor"], "global"),
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
    rounds = settings.rounds(True)
    ways = configs(settings)
    rows: dict[str, dict] = {
        way: {"n": n, "way": way, "kind": kind, "drivers": drivers, "serialization": serialization,
              "runs": [None] * rounds, "errors": []}
        for way, kind, drivers, serialization in ways
    }
    profiles = Profiles(n)
    try:
        for index, (way, kind, drivers, serialization) in interleaved(rounds, ways):
            row = rows[way]
            say(f"security pair {index + 1}/{rounds}: N={n} {way}")
            try:
                if kind == "ceiling":
                    result = profiles.ceiling(index)
                elif kind == "libvirt":
                    result = libvirt_labels(conn, n, relabel=way == BASELINE_LIBVIRT)
                else:
                    result = vb_security(conn, n, drivers, serialization)
            except Exception as e:
                say(f"  failed: {e}")
                row["errors"].append(str(e)[:500])
                continue
            row["runs"][index] = result
            if kind == "ceiling":
                say(f"  {n} compiles: {result['serial_s']:.3f} s one after another, {result['parallel_s']:.3f} s "
                    f"all at once: {result['ceiling']:.2f}x")
            else:
                say(f"  start {result['start_s']:.2f} s, destroy {result['destroy_s']:.2f} s"
                    + "".join(f", {d} labelling {result[f'{d}_label_span_s']:.3f} s" for d in ("dac", "apparmor")
                              if result.get(f"{d}_label_span_s")))
                time.sleep(settings.settle_s)
    finally:
        profiles.remove()
    driver_runs: dict[str, list[float | None]] = {"per-resource": [None] * rounds, "global": [None] * rounds}
    for index, serialization in interleaved(rounds, ["per-resource", "global"]):
        say(f"security: DAC driver alone, {serialization}, pair {index + 1}/{rounds}")
        driver_runs[serialization][index] = driver_labelling(n, serialization)
    for row in rows.values():
        done = [r for r in row["runs"] if r is not None]
        keys = ("serial_s", "parallel_s", "ceiling") if row["kind"] == "ceiling" else (
            "start_s", "destroy_s", "dac_label_span_s", "apparmor_label_span_s", "dac_label_median_ms")
        for key in keys:
            row[f"{key}_spread"] = spread([r.get(key) for r in done])
        for key in ("base_restored", "overlays_restored", "outside_root_refused"):
            values = [r[key] for r in done if key in r]
            row[key] = all(values) if values else None
        row["base_owner_after"] = done[-1].get("base_owner_after") if done else None
        row["pairs"] = len(done)
    return {
        "status": "ok",
        "baseline": f"{BASELINE_LIBVIRT} (libvirt labelling itself), {BASELINE_NONE} (nothing labelled), "
                    "and the same AppArmor compiles alone (the host's ceiling)",
        "note": (
            f"N={n} guests, each on its own qcow2 overlay of one shared base.qcow2 (root:root 0600, "
            f"under /var/tmp), QEMU as {GUEST_USER}. libvirt-dac: a per-domain static DAC seclabel "
            "with relabel='yes' (libvirt labels and, with remember_owner, restores), one thread and "
            "connection per guest; libvirt-none: the files already the guest user's, relabel='no' "
            "(the full run only, as are virtbroker-dac and virtbroker-dac-global). virtbroker: 4 lifecycle "
            "workers and one security worker per driver. "
            "The labelling span is read from the security worker's log (first label start to last "
            f"label end). The ceiling compiles the {n} profiles the AppArmor worker would write "
            "(rendered by its driver), with `apparmor_parser -Q -K`, one after another and all at "
            "once, with no virtbroker running: on 2 cores, CPU-bound compiles cannot gain more than that "
            "ratio from running side by side. "
            f"Each pair runs every way once, the order flipped from pair to pair; the DAC driver "
            f"alone labels the same files from {LABEL_THREADS} threads in one process, in pairs of its own."
        ),
        "pairs": rounds,
        "rows": list(rows.values()),
        "driver": {k: {"label_s": v, "spread": spread(v)} for k, v in driver_runs.items()},
        "targets": targets(rows, driver_runs, settings),
    }


def _span(run: dict | None) -> float | None:
    """The labelling part of one storm with both drivers: the longer of the two workers' spans."""
    spans = [run.get(k) for k in ("dac_label_span_s", "apparmor_label_span_s") if run and run.get(k)]
    return max(spans) if spans else None


def _key(run: dict | None, key: str) -> float | None:
    return run.get(key) if run else None


def targets(rows: dict[str, dict], driver_runs: dict[str, list[float | None]], settings: Settings) -> list[dict]:
    n = settings.security_n
    unjudged = None if n == 20 else f"N={n}, the targets are for N=20"

    def runs(way: str) -> list[dict | None]:
        return rows.get(way, {}).get("runs", [])

    def sp(values, fmt="{:.2f}x") -> str:
        s = spread(values)
        if s["median"] is None:
            return "-"
        return f"{fmt.format(s['median'])} ({fmt.format(s['min'])} to {fmt.format(s['max'])})"

    out = [decide(
        f"DAC and AppArmor on: start storm N={n} / no labelling",
        pair_ratios([(_key(b, "start_s"), _key(s, "start_s")) for b, s in zip(runs(BASELINE_NONE), runs(BOTH_PR))]),
        1.10, LOWER, unjudged=unjudged,
    )]
    speedups = [pair_ratio(_span(pr), _span(g)) for pr, g in zip(runs(BOTH_PR), runs(BOTH_GLOBAL))]
    ceilings = [_key(c, "ceiling") for c in runs(CEILING)]
    out.append(decide(
        f"Labelling part N={n} (DAC and AppArmor, in the storm): global / per-resource, against the host's ceiling",
        pair_ratios(list(zip(ceilings, speedups))), 0.8, HIGHER, limit_text=">= 0.80 of the ceiling",
        unjudged=unjudged,
        note=f"global / per-resource {sp(speedups)}; ceiling (the same {n} compiles one after another / all at "
             f"once, no virtbroker) {sp(ceilings)}",
    ))
    driver = pair_ratios(list(zip(driver_runs["per-resource"], driver_runs["global"])))
    dac_pairs = [(_key(pr, "dac_label_span_s"), _key(g, "dac_label_span_s"))
                 for pr, g in zip(runs(DAC_PR), runs(DAC_GLOBAL))]
    out.append(decide(
        f"DAC part alone N={n}: global / per-resource labelling span in the storm", pair_ratios(dac_pairs), 3.0, HIGHER,
        unjudged=unjudged,
        note=(f"DAC driver alone, in process: {sp(driver)}" if DAC_GLOBAL in rows
              else "the DAC-only storms are run by the full suite only; "
                   f"DAC driver alone, in process: {sp(driver)}"),
    ))
    dac, lv = rows.get(DAC_PR, {}), rows.get(BASELINE_LIBVIRT, {})
    if not dac:
        out.append(not_measured(f"DAC N={n}: virtbroker / libvirt labelling itself, start storm",
                                "<= 1.00x, base restored, roots enforced", "run by the full suite only"))
        return out
    out.append(decide(
        f"DAC N={n}: virtbroker / libvirt labelling itself, start storm",
        pair_ratios([(_key(b, "start_s"), _key(s, "start_s")) for b, s in zip(runs(BASELINE_LIBVIRT), runs(DAC_PR))]),
        1.0, LOWER, limit_text="<= 1.00x, base restored, roots enforced", unjudged=unjudged,
        requires=[("base restored", dac.get("base_restored")),
                  ("outside-root disk refused", dac.get("outside_root_refused"))],
        note=(f"base restored: virtbroker {dac.get('base_restored')}, libvirt {lv.get('base_restored')} "
              f"(libvirt left it {lv.get('base_owner_after')}); "
              f"outside-root disk refused: {dac.get('outside_root_refused')}"),
    ))
    return out
