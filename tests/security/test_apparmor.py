"""AppArmorDriver with the real apparmor_parser (compile-only on kernels without AppArmor)."""

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.waiting import wait_until
from virtbroker.common.errors import ConfigError, SecurityError
from virtbroker.common.resources import Resource
from virtbroker.workers.security.apparmor import AppArmorDriver

pytestmark = pytest.mark.security

REPO = Path(__file__).parents[2]
EMULATOR = "/usr/bin/qemu-system-x86_64"


@pytest.fixture
def images(tmp_path):
    """The storage root; removed with everything the test put in it, also when the test fails."""
    root = tmp_path / "images"
    root.mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def aa_factory(tmp_path, images):
    made: list[AppArmorDriver] = []

    def make(**kw) -> AppArmorDriver:
        kw.setdefault("storage_roots", [str(images)])
        kw.setdefault("allowed_emulators", [EMULATOR])
        driver = AppArmorDriver(tmp_path / "state", tmp_path / "profiles", **kw)
        made.append(driver)
        return driver

    yield make
    try:
        for driver in made:
            for profile in driver.profiles():
                driver.restore(profile.domain_uuid)
            driver.recover()
    finally:
        shutil.rmtree(tmp_path / "profiles", ignore_errors=True)


@pytest.fixture
def aa(aa_factory):
    return aa_factory()


def profile_files(driver: AppArmorDriver) -> list[str]:
    """Every file in the profile directory, temporary dot files included."""
    return sorted(os.listdir(driver.profile_dir))


def journal_entries(driver: AppArmorDriver) -> int:
    """How many journal entries, finished or not, the driver ever wrote."""
    conn = sqlite3.connect(driver.store.db_path)
    try:
        return conn.execute("SELECT count(*) FROM journal WHERE driver = 'apparmor'").fetchone()[0]
    finally:
        conn.close()


def disk(path, readonly: bool = False, kind: str = "disk") -> Resource:
    return Resource(str(path), readonly=readonly, shared=False, kind=kind)


def assert_nothing_written(driver: AppArmorDriver) -> None:
    assert profile_files(driver) == []
    assert driver.profiles() == []
    assert driver.store.pending("apparmor") == []
    assert journal_entries(driver) == 0


def rules_of(text: str) -> list[str]:
    """The rule lines inside the profile block, without includes and comments."""
    body = text[text.index("{") + 1 : text.rindex("}")]
    return [ln.strip() for ln in body.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_generated_profile_grants_only_the_listed_paths(aa, images):
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


def test_crafted_path_cannot_inject_rules(aa, images):
    crafted = f'{images}/disk.img" rwk,\n  /etc/shadow rwk,\n  "/a'
    with pytest.raises(SecurityError, match="which AppArmor would not read literally"):
        aa.label(str(uuid.uuid4()), "evil", [disk(crafted)], EMULATOR)
    assert_nothing_written(aa)


@pytest.mark.parametrize("bad", list('\n\r\0,"\\*?[]{}^\t') + ["@{HOME}"], ids=repr)
def test_every_unsafe_character_is_refused(aa, images, bad):
    path = f"{images}/vm{bad}x.img"
    with pytest.raises(SecurityError, match="which AppArmor would not read literally"):
        aa.label(str(uuid.uuid4()), "vm", [disk(path, readonly=True)], EMULATOR)
    with pytest.raises(SecurityError, match="which AppArmor would not read literally"):
        aa.label(str(uuid.uuid4()), "vm", [], path)  # the emulator path too
    assert_nothing_written(aa)


def test_a_safe_link_to_an_unsafe_name_is_refused(aa, images):
    target = images / "a,b.img"
    target.write_bytes(b"")
    os.symlink(target, images / "safe.img")
    with pytest.raises(SecurityError, match="which AppArmor would not read literally"):
        aa.label(str(uuid.uuid4()), "vm", [disk(images / "safe.img")], EMULATOR)
    assert_nothing_written(aa)


def test_a_profile_the_parser_rejects_is_removed(aa):
    # A real parser failure: the included abstraction does not exist.
    aa.abstraction = "virtbroker-no-such-abstraction"
    dom = str(uuid.uuid4())
    with pytest.raises(SecurityError, match="Could not open 'abstractions/virtbroker-no-such-abstraction'"):
        aa.label(dom, "vm", [], EMULATOR)
    assert profile_files(aa) == []
    assert aa.profiles() == []
    assert aa.store.pending("apparmor") == []


def test_restore_removes_the_profile_and_is_idempotent(aa, images):
    dom = str(uuid.uuid4())
    name = aa.label(dom, "vm", [], EMULATOR)
    # Labelling again (after a hotplug) replaces the profile in place.
    (images / "extra.img").write_bytes(b"")
    assert aa.label(dom, "vm", [disk(images / "extra.img")], EMULATOR) == name
    assert f'"{images}/extra.img" rwk,' in Path(aa.profile_path(dom)).read_text()
    assert aa.restore(dom) == name
    assert profile_files(aa) == []
    assert aa.profiles() == []
    assert aa.restore(dom) is None


_CRASH_SCRIPT = """
import sys
from virtbroker.workers.security.apparmor import AppArmorDriver
state_dir, profile_dir, root, emulator, dom = sys.argv[1:]
driver = AppArmorDriver(state_dir, profile_dir, [root], [emulator], pause_after_write_s=60)
driver.label(dom, "vm", [], emulator)
"""


def test_recover_cleans_up_after_a_crash(aa, tmp_path, images):
    kept = str(uuid.uuid4())
    aa.label(kept, "kept", [], EMULATOR)
    dom = str(uuid.uuid4())
    tmp_file = Path(aa.profile_dir) / f".virtbroker-{dom}.tmp"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASH_SCRIPT, str(tmp_path / "state"), aa.profile_dir, str(images), EMULATOR, dom],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stderr=subprocess.PIPE,
    )
    try:
        def wrote() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode()
            return tmp_file.exists()

        wait_until(wrote, 30, interval_s=0.01, what="the child wrote its profile")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    fresh = AppArmorDriver(tmp_path / "state", aa.profile_dir, [str(images)], [EMULATOR])
    assert [t.domain_uuid for t in fresh.store.pending("apparmor")] == [dom]
    fresh.recover()
    assert profile_files(fresh) == [f"virtbroker-{kept}"]
    assert fresh.store.pending("apparmor") == []
    assert [p.domain_uuid for p in fresh.profiles()] == [kept]


@pytest.mark.parametrize("serialization", ["per-resource", "global"])
def test_ten_domains_in_parallel(aa_factory, images, serialization):
    aa = aa_factory(serialization=serialization)
    doms = [str(uuid.uuid4()) for _ in range(10)]
    (images / "base.qcow2").write_bytes(b"")
    base = disk(images / "base.qcow2", readonly=True, kind="backing")
    with ThreadPoolExecutor(max_workers=10) as pool:
        names = list(pool.map(lambda d: aa.label(d, "vm", [base], EMULATOR), doms))
    assert names == [f"virtbroker-{d}" for d in doms]
    assert profile_files(aa) == sorted(names)
    with ThreadPoolExecutor(max_workers=10) as pool:
        assert list(pool.map(aa.restore, doms)) == names
    assert profile_files(aa) == []


# -- the path policy, the same as the DAC driver's --


def test_a_normal_guest_under_the_root_gets_a_profile_the_parser_accepts(aa, images):
    (images / "vm1").mkdir()
    overlay, base, nvram = images / "vm1" / "disk.qcow2", images / "base.qcow2", images / "vm1" / "VARS.fd"
    for path in (overlay, base, nvram):
        path.write_bytes(b"\0" * 512)
    dom = str(uuid.uuid4())
    resources = [disk(overlay), disk(base, readonly=True, kind="backing"), disk(nvram, kind="nvram")]

    name = aa.label(dom, "vm1", resources, EMULATOR)

    rules = rules_of(Path(aa.profile_path(dom)).read_text())
    assert rules == [
        f'"{os.path.realpath(EMULATOR)}" rmix,',
        f'"{overlay}" rwk,',
        f'"{base}" rk,',
        f'"{nvram}" rwk,',
    ]
    check = subprocess.run([aa.parser, "-Q", "-K", aa.profile_path(dom)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert [p.profile_name for p in aa.profiles()] == [name]


def test_etc_shadow_as_a_disk_is_refused_before_anything_is_written(aa, images):
    with pytest.raises(SecurityError, match=r"refusing disk path '/etc/shadow': .*outside the storage roots") as err:
        aa.label(str(uuid.uuid4()), "evil", [disk("/etc/shadow")], EMULATOR)
    assert str(images) in err.value.message  # the error names the roots the path should be under
    assert_nothing_written(aa)


def test_a_filesystem_of_slash_is_refused_before_anything_is_written(aa):
    with pytest.raises(SecurityError, match=r"refusing filesystem path '/': it resolves to '/', the whole host"):
        aa.label(str(uuid.uuid4()), "evil", [disk("/", kind="filesystem")], EMULATOR)
    assert_nothing_written(aa)


@pytest.mark.parametrize("spelling", ["{root}", "{root}/", "{root}/sub/..", "{root}/./"])
def test_the_storage_root_itself_is_refused(aa, images, spelling):
    (images / "sub").mkdir()
    path = spelling.format(root=images)
    with pytest.raises(SecurityError, match="the storage root .* itself"):
        aa.label(str(uuid.uuid4()), "evil", [disk(path, kind="filesystem")], EMULATOR)
    assert_nothing_written(aa)


def test_a_filesystem_below_the_root_grants_its_tree(aa, images):
    share = images / "shares" / "web"
    share.mkdir(parents=True)
    dom = str(uuid.uuid4())
    aa.label(dom, "web", [Resource(str(share), readonly=True, shared=False, kind="filesystem")], EMULATOR)
    assert rules_of(Path(aa.profile_path(dom)).read_text())[1:] == [f'"{share}/" r,', f'"{share}/**" r,']


def test_a_disk_symlinked_out_of_the_root_is_refused(aa, images):
    os.symlink("/etc/passwd", images / "disk.img")
    with pytest.raises(SecurityError, match=r"it resolves to '/etc/passwd', outside the storage roots"):
        aa.label(str(uuid.uuid4()), "evil", [disk(images / "disk.img")], EMULATOR)
    assert_nothing_written(aa)


def test_a_directory_symlinked_out_of_the_root_is_refused(aa, images):
    os.symlink("/etc", images / "vm1")
    with pytest.raises(SecurityError, match=r"it resolves to '/etc/shadow', outside the storage roots"):
        aa.label(str(uuid.uuid4()), "evil", [disk(images / "vm1" / "shadow")], EMULATOR)
    assert_nothing_written(aa)


def test_dot_dot_out_of_the_root_is_refused(aa, images, tmp_path):
    (tmp_path / "secret.img").write_bytes(b"")
    sneaky = f"{images}/../secret.img"
    with pytest.raises(SecurityError, match="outside the storage roots"):
        aa.label(str(uuid.uuid4()), "evil", [disk(sneaky)], EMULATOR)
    assert_nothing_written(aa)


def test_a_symlink_inside_the_root_is_followed_and_named_by_its_target(aa, images):
    (images / "real.img").write_bytes(b"")
    os.symlink(images / "real.img", images / "alias.img")
    dom = str(uuid.uuid4())
    aa.label(dom, "vm", [disk(images / "alias.img")], EMULATOR)
    assert rules_of(Path(aa.profile_path(dom)).read_text())[1:] == [f'"{images}/real.img" rwk,']


def test_a_hard_linked_file_is_refused(aa, images, tmp_path):
    # A second name inside the root for a file outside it: AppArmor would grant the inode by that name.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    os.link(outside / "secret", images / "disk.img")
    with pytest.raises(SecurityError, match="it has 2 hard links"):
        aa.label(str(uuid.uuid4()), "evil", [disk(images / "disk.img")], EMULATOR)
    assert_nothing_written(aa)


def test_a_missing_disk_is_refused_but_a_socket_qemu_creates_is_not(aa, images):
    with pytest.raises(SecurityError, match="does not exist"):
        aa.label(str(uuid.uuid4()), "vm", [disk(images / "gone.img")], EMULATOR)
    assert_nothing_written(aa)
    dom = str(uuid.uuid4())
    sock = Resource(str(images / "vm.sock"), readonly=False, shared=False, kind="channel", may_be_absent=True)
    aa.label(dom, "vm", [sock], EMULATOR)
    assert rules_of(Path(aa.profile_path(dom)).read_text())[1:] == [f'"{images}/vm.sock" rw,']


def test_a_device_node_outside_the_roots_is_refused(aa):
    with pytest.raises(SecurityError, match=r"refusing disk path '/dev/null': .*outside the storage roots"):
        aa.label(str(uuid.uuid4()), "evil", [disk("/dev/null")], EMULATOR)
    assert_nothing_written(aa)


def test_a_refused_relabel_keeps_the_profile_in_force(aa, images):
    (images / "disk.img").write_bytes(b"")
    dom = str(uuid.uuid4())
    name = aa.label(dom, "vm", [disk(images / "disk.img")], EMULATOR)
    before = Path(aa.profile_path(dom)).read_text()
    with pytest.raises(SecurityError, match="outside the storage roots"):
        aa.label(dom, "vm", [disk(images / "disk.img"), disk("/etc/shadow")], EMULATOR)
    assert Path(aa.profile_path(dom)).read_text() == before
    assert profile_files(aa) == [name]
    assert journal_entries(aa) == 1  # the first label only
    assert aa.store.pending("apparmor") == []


def test_an_emulator_outside_the_allow_list_is_refused(aa):
    with pytest.raises(SecurityError, match=r"refusing emulator '/bin/sh': .*not an allowed emulator"):
        aa.label(str(uuid.uuid4()), "evil", [], "/bin/sh")
    assert_nothing_written(aa)


def test_an_emulator_in_the_allow_list_is_accepted_by_its_resolved_path(aa_factory, images, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    qemu = bin_dir / "qemu-system-test"
    qemu.write_bytes(b"")
    qemu.chmod(0o755)
    os.symlink(qemu, bin_dir / "kvm")
    aa = aa_factory(allowed_emulators=[str(bin_dir / "kvm")])  # listed by a link: compared resolved
    dom = str(uuid.uuid4())
    aa.label(dom, "vm", [], str(qemu))
    assert rules_of(Path(aa.profile_path(dom)).read_text()) == [f'"{qemu}" rmix,']
    # A link that looks like QEMU but resolves elsewhere does not pass.
    os.symlink("/bin/sh", bin_dir / "qemu-system-x86_64")
    with pytest.raises(SecurityError, match="it resolves to .* not an allowed emulator"):
        aa.label(str(uuid.uuid4()), "evil", [], str(bin_dir / "qemu-system-x86_64"))
    assert profile_files(aa) == [f"virtbroker-{dom}"]


def test_no_allowed_emulators_refuses_every_emulator(aa_factory):
    aa = aa_factory(allowed_emulators=[])
    with pytest.raises(SecurityError, match=r"not an allowed emulator \(allowed: none\)"):
        aa.label(str(uuid.uuid4()), "vm", [], EMULATOR)
    assert_nothing_written(aa)


@pytest.mark.parametrize(
    "roots, match",
    [
        ([], "at least one storage root"),
        (["/"], "'/' cannot be a storage root"),
        (["relative/images"], "is not an absolute path"),
        (["{tmp}/no-such-dir"], "is not a directory"),
        (["{tmp}/a-file"], "is not a directory"),
    ],
)
def test_bad_storage_roots_are_a_config_error(tmp_path, roots, match):
    (tmp_path / "a-file").write_bytes(b"")
    roots = [r.format(tmp=tmp_path) for r in roots]
    with pytest.raises(ConfigError, match=match):
        AppArmorDriver(tmp_path / "state", tmp_path / "profiles", roots, [EMULATOR])


@pytest.mark.parametrize(
    "emulator, match", [("qemu-system-x86_64", "not an absolute path"), ("/usr/bin/q,emu", "literally")]
)
def test_bad_allowed_emulators_are_a_config_error(tmp_path, images, emulator, match):
    with pytest.raises(ConfigError, match=match):
        AppArmorDriver(tmp_path / "state", tmp_path / "profiles", [str(images)], [emulator])
