"""AppArmorDriver with the real apparmor_parser (compile-only on kernels without AppArmor)."""

import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from common.errors import SecurityError
from common.resources import Resource
from workers.security.apparmor import AppArmorDriver

pytestmark = pytest.mark.security

REPO = Path(__file__).parents[2]
EMULATOR = "/usr/bin/qemu-system-x86_64"


@pytest.fixture
def aa_factory(tmp_path):
    made: list[AppArmorDriver] = []

    def make(**kw) -> AppArmorDriver:
        driver = AppArmorDriver(tmp_path / "state", tmp_path / "profiles", **kw)
        made.append(driver)
        return driver

    yield make
    for driver in made:
        for profile in driver.profiles():
            driver.restore(profile.domain_uuid)
        driver.recover()


@pytest.fixture
def aa(aa_factory):
    return aa_factory()


def profile_files(driver: AppArmorDriver) -> list[str]:
    return sorted(os.listdir(driver.profile_dir))


def rules_of(text: str) -> list[str]:
    """The rule lines inside the profile block, without includes and comments."""
    body = text[text.index("{") + 1 : text.rindex("}")]
    return [ln.strip() for ln in body.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_generated_profile_grants_only_the_listed_paths(aa, tmp_path):
    images = tmp_path / "images"
    (images / "share").mkdir(parents=True)
    for name in ("vm.qcow2", "base.qcow2", "vmlinuz", "boot.iso"):
        (images / name).write_bytes(b"")
    os.symlink(images / "vm.qcow2", images / "link.qcow2")
    dom = str(uuid.uuid4())
    resources = [
        Resource(str(images / "link.qcow2"), readonly=False, shared=False, kind="disk"),  # rule names the target
        Resource(str(images / "base.qcow2"), readonly=True, shared=False, kind="backing"),
        Resource(str(images / "vmlinuz"), readonly=True, shared=False, kind="kernel"),
        Resource(str(images / "boot.iso"), readonly=True, shared=False, kind="cdrom"),
        Resource(str(images / "share"), readonly=False, shared=False, kind="filesystem"),
        Resource(str(images / "serial.sock"), readonly=False, shared=False, kind="serial", may_be_absent=True),
        Resource(str(images / "vm.qcow2"), readonly=True, shared=False, kind="cdrom"),  # read-write use wins
    ]

    name = aa.label(dom, "web-1", resources, EMULATOR)

    assert name == f"virtbroker-{dom}"
    assert profile_files(aa) == [name]
    text = Path(aa.profile_path(dom)).read_text()
    assert "#include <tunables/global>\n" in text
    assert f"\nprofile {name} flags=(attach_disconnected) {{\n" in text
    assert f"  #include <abstractions/{aa.abstraction}>\n" in text
    assert rules_of(text) == [
        f'"{os.path.realpath(EMULATOR)}" rmix,',
        f'"{images}/vm.qcow2" rwk,',
        f'"{images}/base.qcow2" rk,',
        f'"{images}/vmlinuz" r,',
        f'"{images}/boot.iso" rk,',
        f'"{images}/share/" r,',
        f'"{images}/share/**" rwk,',
        f'"{images}/serial.sock" rw,',
    ]
    # The real parser accepts the file as written (the driver ran it too).
    check = subprocess.run([aa.parser, "-Q", "-K", aa.profile_path(dom)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert [(p.domain_uuid, p.profile_name, p.loaded) for p in aa.profiles()] == [(dom, name, aa.kernel_has_apparmor())]


def test_crafted_path_cannot_inject_rules(aa):
    crafted = '/root/x/disk.img" rwk,\n  /etc/shadow rwk,\n  "/a'
    with pytest.raises(SecurityError, match="refusing"):
        aa.label(str(uuid.uuid4()), "evil", [Resource(crafted, readonly=False, shared=False, kind="disk")], EMULATOR)
    assert profile_files(aa) == []
    assert aa.profiles() == []
    assert aa.store.pending("apparmor") == []


@pytest.mark.parametrize("bad", list('\n\r\0,"\\*?[]{}^\t') + ["@{HOME}"], ids=repr)
def test_every_unsafe_character_is_refused(aa, bad):
    path = f"/srv/images/vm{bad}x.img"
    with pytest.raises(SecurityError, match="refusing"):
        aa.label(str(uuid.uuid4()), "vm", [Resource(path, readonly=True, shared=False, kind="disk")], EMULATOR)
    with pytest.raises(SecurityError, match="refusing"):
        aa.label(str(uuid.uuid4()), "vm", [], path)  # the emulator path too
    assert profile_files(aa) == []


def test_a_safe_link_to_an_unsafe_name_is_refused(aa, tmp_path):
    target = tmp_path / "a,b.img"
    target.write_bytes(b"")
    os.symlink(target, tmp_path / "safe.img")
    with pytest.raises(SecurityError, match="refusing"):
        aa.label(str(uuid.uuid4()), "vm", [Resource(str(tmp_path / "safe.img"), False, False, "disk")], EMULATOR)
    assert profile_files(aa) == []


def test_a_profile_the_parser_rejects_is_removed(aa_factory, tmp_path):
    # A real parser failure: the included abstraction does not exist.
    aa = aa_factory(abstraction="virtbroker-no-such-abstraction")
    dom = str(uuid.uuid4())
    with pytest.raises(SecurityError, match="Could not open 'abstractions/virtbroker-no-such-abstraction'"):
        aa.label(dom, "vm", [], EMULATOR)
    assert profile_files(aa) == []
    assert aa.profiles() == []
    assert aa.store.pending("apparmor") == []


def test_restore_removes_the_profile_and_is_idempotent(aa):
    dom = str(uuid.uuid4())
    name = aa.label(dom, "vm", [], EMULATOR)
    # Labelling again (after a hotplug) replaces the profile in place.
    assert aa.label(dom, "vm", [Resource("/srv/extra.img", False, False, "disk")], EMULATOR) == name
    assert '"/srv/extra.img" rwk,' in Path(aa.profile_path(dom)).read_text()
    assert aa.restore(dom) == name
    assert profile_files(aa) == []
    assert aa.profiles() == []
    assert aa.restore(dom) is None


_CRASH_SCRIPT = """
import sys
from workers.security.apparmor import AppArmorDriver
state_dir, profile_dir, dom = sys.argv[1:]
AppArmorDriver(state_dir, profile_dir, pause_after_write_s=60).label(dom, "vm", [], "/usr/bin/qemu-system-x86_64")
"""


def test_recover_cleans_up_after_a_crash(aa, tmp_path):
    kept = str(uuid.uuid4())
    aa.label(kept, "kept", [], EMULATOR)
    dom = str(uuid.uuid4())
    tmp_file = Path(aa.profile_dir) / f".virtbroker-{dom}.tmp"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASH_SCRIPT, str(tmp_path / "state"), aa.profile_dir, dom],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not tmp_file.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "child never wrote its profile"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    fresh = AppArmorDriver(tmp_path / "state", aa.profile_dir)
    assert [t.domain_uuid for t in fresh.store.pending("apparmor")] == [dom]
    fresh.recover()
    assert profile_files(fresh) == [f"virtbroker-{kept}"]
    assert fresh.store.pending("apparmor") == []
    assert [p.domain_uuid for p in fresh.profiles()] == [kept]


@pytest.mark.parametrize("serialization", ["per-resource", "global"])
def test_ten_domains_in_parallel(aa_factory, serialization):
    aa = aa_factory(serialization=serialization)
    doms = [str(uuid.uuid4()) for _ in range(10)]
    disk = Resource("/srv/images/base.qcow2", readonly=True, shared=False, kind="backing")
    with ThreadPoolExecutor(max_workers=10) as pool:
        names = list(pool.map(lambda d: aa.label(d, "vm", [disk], EMULATOR), doms))
    assert names == [f"virtbroker-{d}" for d in doms]
    assert profile_files(aa) == sorted(names)
    with ThreadPoolExecutor(max_workers=10) as pool:
        assert list(pool.map(aa.restore, doms)) == names
    assert profile_files(aa) == []
