"""DacDriver against a guest that fights back: swapped and hard-linked files in a directory it
owns, corrupt records, hundreds of sharers, set-id bits. Real files, the real guest user,
real trusted.* xattrs on the local disk and none on a real ramfs."""

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.security.conftest import GUEST_USER, ORIGINAL_GID, ORIGINAL_UID, owner_and_mode
from virtbroker.common.errors import ConfigError, SecurityError
from virtbroker.common.resources import Resource
from virtbroker.common.statelock import StateLock
from virtbroker.workers.security.dac import XATTR_NAME, DacDriver

pytestmark = pytest.mark.security

SET_ID = 0o6000


def new_uuid() -> str:
    return str(uuid.uuid4())


def disk(path) -> Resource:
    return Resource(str(path), readonly=False, shared=False, kind="disk")


def share(path) -> Resource:
    return Resource(str(path), readonly=False, shared=False, kind="filesystem")


def backing(path) -> Resource:
    return Resource(str(path), readonly=True, shared=True, kind="backing")


def xattr_raw(path) -> bytes | None:
    try:
        return os.getxattr(path, XATTR_NAME)
    except OSError:
        return None


def as_guest(script: str) -> None:
    """Run a shell script as the real unprivileged guest user, as QEMU (or the guest
    through a <filesystem> share) would act on its files."""
    result = subprocess.run(
        ["runuser", "-u", GUEST_USER, "--", "sh", "-euc", script], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, f"as {GUEST_USER}: {script}\n{result.stderr}"


def make_file(path: Path, mode: int, uid: int = ORIGINAL_UID, gid: int = ORIGINAL_GID, data: bytes = b"\0" * 4096):
    path.write_bytes(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)  # after chown, which clears set-id bits
    return path


class Root:
    """A storage root the guest user can traverse (0711), on the local disk or on a ramfs,
    and DAC drivers over it; cleanup restores every domain, unmounts and removes it."""

    def __init__(self, fs: str, state_dir: Path, guest_ids: tuple[int, int]):
        self.fs = fs
        self.uid, self.gid = guest_ids
        self.state_dir = state_dir
        self.path = Path(tempfile.mkdtemp(prefix="vbdac-", dir="/var/tmp"))
        self.mounted = False
        self.drivers: list[DacDriver] = []
        if fs == "ramfs":
            subprocess.run(["mount", "-t", "ramfs", "-o", "mode=0711", "ramfs", str(self.path)], check=True)
            self.mounted = True
        self.path.chmod(0o711)

    def driver(self) -> DacDriver:
        driver = DacDriver(self.state_dir, self.uid, self.gid, [str(self.path)])
        self.drivers.append(driver)
        return driver

    def cleanup(self) -> None:
        try:
            for driver in self.drivers:
                for dom in driver.domains():
                    try:
                        driver.restore(dom)
                    except SecurityError:
                        pass
                driver.store.close()
        finally:
            if self.mounted:
                subprocess.run(["umount", "-l", str(self.path)], check=False)
            shutil.rmtree(self.path, ignore_errors=True)


@pytest.fixture(params=["disk", "ramfs"])
def root(request, tmp_path, guest_ids):
    root = Root(request.param, tmp_path / "state", guest_ids)
    try:
        yield root
    finally:
        root.cleanup()


@pytest.fixture
def disk_root(tmp_path, guest_ids):
    root = Root("disk", tmp_path / "state", guest_ids)
    try:
        yield root
    finally:
        root.cleanup()


def test_ramfs_has_no_trusted_xattrs_and_the_local_disk_has(root):
    # What the swap test relies on: one filesystem keeps records on the inode, one in the store.
    probe = make_file(root.path / "probe", 0o600)
    try:
        os.setxattr(probe, "trusted.virtbroker.probe", b"1")
        works = True
    except OSError:
        works = False
    assert works == (root.fs == "disk")


def test_a_file_swapped_by_the_guest_is_left_as_the_guest_left_it(root):
    """The guest owns the shared directory while it runs, so it can rename the labelled
    file away and put its own file at the same path. The restore must not make that file
    root's, with the original's set-id bits."""
    driver = root.driver()
    shared = root.path / "share"
    shared.mkdir(mode=0o755)
    os.chown(shared, 0, 0)
    original = make_file(shared / "tool", 0o4755, uid=0, gid=0, data=b"#!/bin/sh\necho original\n")
    original_ino = os.stat(original).st_ino
    dom = new_uuid()

    driver.label(dom, [share(shared), disk(original)])
    assert owner_and_mode(original) == (root.uid, root.gid, 0o755)  # chown cleared the setuid bit
    if root.fs == "disk":
        assert json.loads(xattr_raw(original))["ino"] == original_ino
    else:
        assert xattr_raw(original) is None
        assert json.loads(driver.store.get_owner(str(original)))["ino"] == original_ino

    as_guest(
        f"cd {shared}; mv tool tool.orig; printf '#!/bin/sh\\necho mine\\n' > mine; chmod 0755 mine; mv mine tool"
    )
    swapped = os.stat(original)
    assert swapped.st_ino != original_ino and swapped.st_uid == root.uid
    left_by_guest = owner_and_mode(original)

    assert sorted(driver.restore(dom)) == sorted([str(shared), str(original)])

    assert owner_and_mode(original) == left_by_guest == (root.uid, root.gid, 0o755)
    assert xattr_raw(original) is None
    assert owner_and_mode(shared) == (0, 0, 0o755)  # the directory itself was never swapped
    # The swapped-away original: given back by its record or still the guest's, but in no
    # case root's (or anyone's) with a set-id bit.
    moved = shared / "tool.orig"
    assert os.stat(moved).st_ino == original_ino
    uid, gid, mode = owner_and_mode(moved)
    assert mode & SET_ID == 0
    assert (uid, gid) in ((0, 0), (root.uid, root.gid))
    # The journal entry is finished and the records are gone.
    assert driver.store.pending("dac") == []
    assert driver.labelled(dom) == []
    assert driver.store.ref_paths(dom) == []
    assert driver.store.get_owner(str(original)) is None


def test_a_file_the_guest_hard_linked_is_not_given_back(disk_root):
    root = disk_root
    driver = root.driver()
    shared = root.path / "share"
    shared.mkdir(mode=0o755)
    image = make_file(shared / "vm.img", 0o2640)
    dom = new_uuid()
    driver.label(dom, [share(shared), disk(image)])
    # protected_hardlinks lets the guest link a file it owns, under a name we never see.
    as_guest(f"ln {image} {shared}/second-name")
    assert os.stat(image).st_nlink == 2
    labelled = owner_and_mode(image)
    assert labelled[:2] == (root.uid, root.gid)

    driver.restore(dom)

    assert owner_and_mode(image) == labelled
    assert driver.store.pending("dac") == [] and driver.labelled(dom) == []


def test_restore_never_sets_set_id_bits_and_keeps_the_rest_of_the_mode(disk_root):
    root = disk_root
    driver = root.driver()
    files = {
        make_file(root.path / "suid", 0o4755): 0o755,
        make_file(root.path / "sgid", 0o2750): 0o750,
        make_file(root.path / "both", 0o6711): 0o711,
    }
    folder = root.path / "setgid-dir"
    folder.mkdir()
    os.chown(folder, ORIGINAL_UID, ORIGINAL_GID)
    folder.chmod(0o3775)  # set-gid and sticky
    dom = new_uuid()
    driver.label(dom, [disk(p) for p in files] + [share(folder)])
    driver.restore(dom)
    for path, mode in files.items():
        assert owner_and_mode(path) == (ORIGINAL_UID, ORIGINAL_GID, mode)
    assert owner_and_mode(folder) == (ORIGINAL_UID, ORIGINAL_GID, 0o1775)


def test_a_file_given_another_owner_meanwhile_is_left_alone(disk_root):
    root = disk_root
    driver = root.driver()
    image = make_file(root.path / "vm.img", 0o640)
    dom = new_uuid()
    driver.label(dom, [disk(image)])
    os.chown(image, 5555, 5555)  # an administrator's decision, made while the guest ran
    driver.restore(dom)
    assert owner_and_mode(image)[:2] == (5555, 5555)
    assert xattr_raw(image) is None and driver.store.pending("dac") == []


def test_three_hundred_guests_share_one_base_image_and_the_record_stays_small(disk_root):
    root = disk_root
    driver = root.driver()
    base = make_file(root.path / "base.qcow2", 0o444)
    doms = [new_uuid() for _ in range(300)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(lambda d: driver.label(d, [backing(base)]), doms)) == [[str(base)]] * 300
    raw = xattr_raw(base)
    assert raw is not None and len(raw) < 256, raw
    assert json.loads(raw)["refs"] == 300
    assert owner_and_mode(base) == (root.uid, root.gid, 0o444)

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(driver.restore, doms)) == [[str(base)]] * 300
    assert owner_and_mode(base) == (ORIGINAL_UID, ORIGINAL_GID, 0o444)
    assert xattr_raw(base) is None
    assert driver.domains() == [] and driver.store.pending("dac") == []
    assert driver.store.get_owner(str(base)) is None


CORRUPT_RECORDS = {
    "not-json": b"\xffnot json",
    "a-list": b"[1, 2]",
    "old-format": json.dumps({"uid": 0, "gid": 0, "mode": 0o644, "refs": ["a"]}).encode(),
    "string-uid": json.dumps(
        {"uid": "0", "gid": 0, "mode": 0o644, "dev": 1, "ino": 2, "label_uid": 1, "label_gid": 1, "refs": 1}
    ).encode(),
    "bool-refs": json.dumps(
        {"uid": 0, "gid": 0, "mode": 0o644, "dev": 1, "ino": 2, "label_uid": 1, "label_gid": 1, "refs": True}
    ).encode(),
    "mode-too-big": json.dumps(
        {"uid": 0, "gid": 0, "mode": 0o17777, "dev": 1, "ino": 2, "label_uid": 1, "label_gid": 1, "refs": 1}
    ).encode(),
}


@pytest.mark.parametrize("raw", list(CORRUPT_RECORDS.values()), ids=list(CORRUPT_RECORDS))
def test_a_corrupt_record_is_refused_at_label_and_changes_nothing(disk_root, raw):
    root = disk_root
    driver = root.driver()
    good = make_file(root.path / "good.img", 0o640)
    bad = make_file(root.path / "bad.img", 0o640)
    os.setxattr(bad, XATTR_NAME, raw)
    dom = new_uuid()

    with pytest.raises(SecurityError) as err:
        driver.label(dom, [disk(good), disk(bad)])

    assert str(bad) in err.value.message and XATTR_NAME in err.value.message
    assert "record" in err.value.message
    for path in (good, bad):
        assert owner_and_mode(path) == (ORIGINAL_UID, ORIGINAL_GID, 0o640)
    assert xattr_raw(bad) == raw and xattr_raw(good) is None
    assert driver.store.pending("dac") == [] and driver.store.ref_paths(dom) == []


def test_a_record_corrupted_while_labelled_stops_the_restore_until_fixed(disk_root):
    root = disk_root
    driver = root.driver()
    image = make_file(root.path / "vm.img", 0o640)
    dom = new_uuid()
    driver.label(dom, [disk(image)])
    os.setxattr(image, XATTR_NAME, b'{"uid": -1}')

    with pytest.raises(SecurityError, match="not a valid record"):
        driver.restore(dom)
    assert owner_and_mode(image) == (root.uid, root.gid, 0o640)
    assert xattr_raw(image) == b'{"uid": -1}'
    assert [t.op for t in driver.store.pending("dac")] == ["restore"]

    # Fixed by hand: the restore finishes; with no record there is nothing to give back.
    os.removexattr(image, XATTR_NAME)
    assert driver.restore(dom) == [str(image)]
    assert driver.store.pending("dac") == [] and driver.domains() == []


def test_state_dir_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    path = tmp_path / "security-dac" / "driver.lock"
    first = StateLock(path, "a dac security worker")
    try:
        with pytest.raises(ConfigError) as err:
            StateLock(path, "a dac security worker")
        assert f"pid {os.getpid()}" in err.value.message and str(path) in err.value.message
        assert "\n" not in err.value.message
    finally:
        first.release()
    # Released: the next one takes it.
    StateLock(path, "a dac security worker").release()
