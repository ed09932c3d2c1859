"""DacDriver on real files, a real guest user, real immutable files and a real SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.security.conftest import ORIGINAL_GID, ORIGINAL_UID, owner_and_mode
from tests.waiting import wait_until
from virtbroker.common.errors import SecurityError
from virtbroker.common.resources import Resource
from virtbroker.workers.security.dac import XATTR_NAME
from virtbroker.workers.security.locks import PathLocks

pytestmark = pytest.mark.security

REPO = Path(__file__).parents[2]
SERIALIZATIONS = ["per-resource", "global"]


def disk(path: str) -> Resource:
    return Resource(path, readonly=False, shared=False, kind="disk")


def backing(path: str) -> Resource:
    return Resource(path, readonly=True, shared=False, kind="backing")


def new_uuid() -> str:
    return str(uuid.uuid4())


def xattr_record(path: str) -> dict | None:
    if XATTR_NAME not in os.listxattr(path):
        return None
    return json.loads(os.getxattr(path, XATTR_NAME))


@pytest.mark.parametrize("serialization", SERIALIZATIONS)
def test_label_then_restore_gives_back_exact_owner_and_mode(lab, serialization):
    driver = lab.driver(serialization=serialization)
    # Set-id bits: chown() clears them, and a restore never sets them again.
    rw_disk = lab.image("vm.qcow2", mode=0o6750)
    ro_iso = lab.image("boot.iso", mode=0o400, uid=0, gid=0)
    share = lab.root / "share"
    share.mkdir(mode=0o700)
    before = {p: owner_and_mode(p) for p in (rw_disk, ro_iso, str(share))}
    dom = new_uuid()

    labelled = driver.label(
        dom,
        [
            disk(rw_disk),
            Resource(ro_iso, readonly=True, shared=False, kind="cdrom"),
            Resource(str(share), readonly=False, shared=False, kind="filesystem"),
            # QEMU creates a listening socket itself: absent now, so not labelled.
            Resource(str(lab.root / "agent.sock"), readonly=False, shared=False, kind="channel", may_be_absent=True),
        ],
    )

    assert labelled == [rw_disk, ro_iso, str(share)]
    assert driver.labelled(dom) == sorted(labelled)
    assert owner_and_mode(rw_disk) == (lab.uid, lab.gid, 0o750 | 0o600)
    assert owner_and_mode(ro_iso) == (lab.uid, lab.gid, 0o400)
    assert owner_and_mode(str(share)) == (lab.uid, lab.gid, 0o700)
    st = os.stat(rw_disk)
    assert xattr_record(rw_disk) == {
        "uid": ORIGINAL_UID, "gid": ORIGINAL_GID, "mode": 0o6750, "dev": st.st_dev, "ino": st.st_ino,
        "label_uid": lab.uid, "label_gid": lab.gid, "refs": 1,
    }

    assert sorted(driver.restore(dom)) == sorted(labelled)
    before[rw_disk] = (ORIGINAL_UID, ORIGINAL_GID, 0o750)  # everything but the set-id bits
    for path, original in before.items():
        assert owner_and_mode(path) == original
        assert xattr_record(path) is None
    assert driver.labelled(dom) == []
    # Idempotent.
    assert driver.restore(dom) == []
    assert owner_and_mode(rw_disk) == before[rw_disk]


def test_labelling_twice_is_idempotent(lab):
    driver = lab.driver()
    image = lab.image("vm.img")
    dom = new_uuid()
    assert driver.label(dom, [disk(image)]) == [image]
    assert driver.label(dom, [disk(image)]) == [image]
    assert xattr_record(image)["refs"] == 1
    driver.restore(dom)
    assert owner_and_mode(image) == (ORIGINAL_UID, ORIGINAL_GID, 0o640)


def test_shared_base_image_stays_labelled_until_its_last_user_restores(lab):
    driver = lab.driver()
    base = lab.image("base.qcow2", mode=0o444)
    doms = [new_uuid() for _ in range(5)]
    overlays = [lab.image(f"vm{i}.qcow2") for i in range(5)]
    for dom, overlay in zip(doms, overlays):
        driver.label(dom, [disk(overlay), backing(base)])
    assert xattr_record(base)["refs"] == 5

    for i, dom in enumerate(doms[:-1]):
        assert base in driver.restore(dom)
        assert owner_and_mode(overlays[i]) == (ORIGINAL_UID, ORIGINAL_GID, 0o640)
        assert owner_and_mode(base) == (lab.uid, lab.gid, 0o444)
        assert xattr_record(base)["refs"] == 4 - i

    driver.restore(doms[-1])
    assert owner_and_mode(base) == (ORIGINAL_UID, ORIGINAL_GID, 0o444)
    assert xattr_record(base) is None


@pytest.mark.parametrize("force_store", [False, True], ids=["xattr", "store"])
def test_failure_on_third_of_four_disks_rolls_back_the_first_two(lab, force_store):
    driver = lab.driver(force_store=force_store)
    disks = [lab.image(f"d{i}.img", mode=0o600) for i in range(4)]
    # A real failure: an immutable file refuses setxattr() and chown() even to root.
    lab.make_immutable(disks[2])
    dom = new_uuid()

    with pytest.raises(SecurityError) as err:
        driver.label(dom, [disk(p) for p in disks])

    assert disks[2] in str(err.value)
    assert "Operation not permitted" in str(err.value)
    for path in disks:
        assert owner_and_mode(path) == (ORIGINAL_UID, ORIGINAL_GID, 0o600)
        assert xattr_record(path) is None
        assert driver.store.get_owner(path) is None
    assert driver.labelled(dom) == []
    assert driver.store.pending("dac") == []


def test_refuses_etc_shadow_and_touches_nothing(lab):
    driver = lab.driver()
    good = lab.image("good.img")
    shadow_before = (owner_and_mode("/etc/shadow"), os.listxattr("/etc/shadow"))

    with pytest.raises(SecurityError, match="outside the storage roots"):
        driver.label(new_uuid(), [disk(good), disk("/etc/shadow")])

    assert (owner_and_mode("/etc/shadow"), os.listxattr("/etc/shadow")) == shadow_before
    assert owner_and_mode(good) == (ORIGINAL_UID, ORIGINAL_GID, 0o640)
    assert xattr_record(good) is None


@pytest.mark.parametrize("target", ["outside", "/etc/shadow", "dotdot"])
def test_refuses_paths_escaping_the_roots(lab, target):
    driver = lab.driver()
    good = lab.image("good.img")
    if target == "outside":
        victim = lab.image("secret", where=lab.outside)
        path = str(lab.root / "escape.img")
        os.symlink(victim, path)
    elif target == "/etc/shadow":
        victim = "/etc/shadow"
        path = str(lab.root / "escape.img")
        os.symlink(victim, path)
    else:
        victim = lab.image("secret", where=lab.outside)
        path = f"{lab.root}/../outside/secret"
    victim_before = (owner_and_mode(victim), os.listxattr(victim))

    with pytest.raises(SecurityError, match="outside the storage roots"):
        driver.label(new_uuid(), [disk(good), disk(path)])

    assert (owner_and_mode(victim), os.listxattr(victim)) == victim_before
    assert owner_and_mode(good) == (ORIGINAL_UID, ORIGINAL_GID, 0o640)


def test_refuses_missing_dangling_and_hard_linked_files(lab):
    driver = lab.driver()
    good = lab.image("good.img")
    os.symlink(str(lab.root / "nowhere.img"), lab.root / "dangling.img")
    linked = lab.image("linked.img")
    os.link(linked, lab.root / "second-name.img")
    for bad, reason in [
        (str(lab.root / "missing.img"), "does not exist"),
        (str(lab.root / "dangling.img"), "does not exist"),
        (linked, "hard links"),
        (str(lab.root), "outside the storage roots"),  # the root itself is not "under" it
    ]:
        with pytest.raises(SecurityError, match=reason):
            driver.label(new_uuid(), [disk(good), disk(bad)])
    assert owner_and_mode(good) == (ORIGINAL_UID, ORIGINAL_GID, 0o640)
    assert owner_and_mode(linked) == (ORIGINAL_UID, ORIGINAL_GID, 0o640)


_CRASH_SCRIPT = """
import sys
from virtbroker.common.resources import Resource
from virtbroker.workers.security.dac import DacDriver
state_dir, root, uid, gid, dom, *paths = sys.argv[1:]
driver = DacDriver(state_dir, int(uid), int(gid), [root], pause_after_each_s=0.5)
driver.label(dom, [Resource(p, readonly=False, shared=False, kind="disk") for p in paths])
print("finished", flush=True)
"""


@pytest.mark.parametrize("cleanup", ["recover", "restore"])
def test_crash_mid_transaction_is_undone(lab, cleanup):
    files = [lab.image(f"crash{i}.img", mode=0o600) for i in range(6)]
    # files[0] is also used by a committed domain: recovery must leave its reference.
    other = new_uuid()
    lab.driver().label(other, [backing(files[0])])
    dom = new_uuid()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASH_SCRIPT, str(lab.state_dir), str(lab.root), str(lab.uid), str(lab.gid), dom]
        + files,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # Ready when the child has labelled two files of its own (it pauses 0.5 s after each).
        def labelled_two() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode()
            return sum(os.stat(p).st_uid == lab.uid for p in files[1:]) >= 2

        wait_until(labelled_two, 30, interval_s=0.01, what="the child labelled two files")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert any(os.stat(p).st_uid != lab.uid for p in files[1:]), "child finished before the kill"

    fresh = lab.driver()  # a new process would build a new driver over the same state
    assert [t.domain_uuid for t in fresh.store.pending("dac")] == [dom]
    if cleanup == "recover":
        restored = fresh.recover()
    else:
        restored = fresh.restore(dom)
    # files[0] is let go by the crashed domain but stays labelled for the other one.
    assert files[0] in restored and files[1] in restored

    for path in files[1:]:
        assert owner_and_mode(path) == (ORIGINAL_UID, ORIGINAL_GID, 0o600)
        assert xattr_record(path) is None
    assert owner_and_mode(files[0]) == (lab.uid, lab.gid, 0o600)
    assert xattr_record(files[0])["refs"] == 1
    assert fresh.store.pending("dac") == []
    assert fresh.labelled(dom) == []
    assert fresh.labelled(other) == [files[0]]


def test_owner_store_fallback(lab):
    # tmpfs and ext4 here both take trusted.* xattrs, so the fallback is forced.
    store_driver = lab.driver(force_store=True)
    image = lab.image("vm.img", mode=0o604)
    dom = new_uuid()
    store_driver.label(dom, [disk(image)])
    assert xattr_record(image) is None
    st = os.stat(image)
    remembered = json.loads(store_driver.store.get_owner(image))
    assert remembered == {
        "uid": ORIGINAL_UID, "gid": ORIGINAL_GID, "mode": 0o604, "dev": st.st_dev, "ino": st.st_ino,
        "label_uid": lab.uid, "label_gid": lab.gid, "refs": 1,
    }
    assert owner_and_mode(image) == (lab.uid, lab.gid, 0o604)

    # A second domain through a default driver finds the record in the store, keeps it there.
    xattr_driver = lab.driver()
    dom2 = new_uuid()
    xattr_driver.label(dom2, [backing(image)])
    assert xattr_record(image) is None
    assert json.loads(store_driver.store.get_owner(image))["refs"] == 2

    xattr_driver.restore(dom)
    store_driver.restore(dom2)
    assert owner_and_mode(image) == (ORIGINAL_UID, ORIGINAL_GID, 0o604)
    assert store_driver.store.get_owner(image) is None


@pytest.mark.parametrize("serialization", SERIALIZATIONS)
def test_twenty_threads_label_twenty_domains_sharing_one_backing_file(lab, serialization):
    driver = lab.driver(serialization=serialization)
    base = lab.image("base.qcow2", mode=0o440)
    doms = [new_uuid() for _ in range(20)]
    overlays = {dom: lab.image(f"{dom}.qcow2") for dom in doms}

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda d: driver.label(d, [disk(overlays[d]), backing(base)]), doms))
    assert results == [[overlays[d], base] for d in doms]
    assert xattr_record(base)["refs"] == 20
    assert owner_and_mode(base) == (lab.uid, lab.gid, 0o440)

    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(driver.restore, doms))
    assert owner_and_mode(base) == (ORIGINAL_UID, ORIGINAL_GID, 0o440)
    assert xattr_record(base) is None
    for overlay in overlays.values():
        assert owner_and_mode(overlay) == (ORIGINAL_UID, ORIGINAL_GID, 0o640)
    assert driver.domains() == []


@pytest.mark.parametrize("serialization", SERIALIZATIONS)
def test_path_locks_serialize_only_what_they_should(tmp_path, serialization):
    locks = PathLocks(tmp_path / "locks", serialization)
    # Two threads holding locks on different paths meet at a barrier: possible only if
    # neither waits for the other, i.e. in per-resource mode.
    barrier = threading.Barrier(2, timeout=2)
    met: list[bool] = []

    def hold(path: str) -> None:
        with locks.locked([path]):
            try:
                barrier.wait()
                met.append(True)
            except threading.BrokenBarrierError:
                met.append(False)

    threads = [threading.Thread(target=hold, args=(p,)) for p in ("/a", "/b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert met == ([True, True] if serialization == "per-resource" else [False, False])

    # The same path is never held twice at once, by any number of threads.
    holders = 0
    most = 0
    guard = threading.Lock()

    def count() -> None:
        nonlocal holders, most
        with locks.locked(["/same", "/same"]):
            with guard:
                holders += 1
                most = max(most, holders)
            time.sleep(0.001)
            with guard:
                holders -= 1

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda _: count(), range(40)))
    assert most == 1
    assert os.listdir(tmp_path / "locks") == []  # lock files do not pile up
