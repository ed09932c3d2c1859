"""Fixtures for the security drivers: a real unprivileged guest user, storage roots, cleanup."""

import grp
import os
import pwd
import subprocess
from pathlib import Path

import pytest

from virtbroker.workers.security.dac import DacDriver

GUEST_USER = "vbguest"
# Owner of the test images before labelling: neither root nor the guest, so a restore
# that put back "some" owner instead of the original one would show.
ORIGINAL_UID = 4321
ORIGINAL_GID = 4322


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="session")
def guest_ids() -> tuple[int, int]:
    """(uid, gid) of the unprivileged user QEMU would run as; created once if absent."""
    if os.geteuid() != 0:
        pytest.skip("security tests need root: chown, trusted.* xattrs, chattr, useradd")
    try:
        pw = pwd.getpwnam(GUEST_USER)
    except KeyError:
        cmd = ["useradd", "-r", "-M", "-U", "-s", "/usr/sbin/nologin"]
        if _group_exists("kvm"):
            cmd += ["-G", "kvm"]
        result = subprocess.run(cmd + [GUEST_USER], capture_output=True, text=True, check=False)
        try:
            pw = pwd.getpwnam(GUEST_USER)
        except KeyError:
            # Exit status 9 is "already exists": another session won the race.
            raise RuntimeError(f"useradd {GUEST_USER} failed: {result.stderr.strip()}") from None
    if _group_exists("kvm") and GUEST_USER not in grp.getgrnam("kvm").gr_mem:
        subprocess.run(["usermod", "-aG", "kvm", GUEST_USER], check=True)
    yield pw.pw_uid, pw.pw_gid


class Lab:
    """A storage root with real files, DAC drivers over it, and cleanup that always runs."""

    def __init__(self, tmp_path: Path, guest_ids: tuple[int, int]):
        self.uid, self.gid = guest_ids
        self.root = tmp_path / "images"
        self.outside = tmp_path / "outside"
        self.state_dir = tmp_path / "state"
        self.root.mkdir()
        self.outside.mkdir()
        self.drivers: list[DacDriver] = []
        self.immutable: list[Path] = []

    def driver(self, **kw) -> DacDriver:
        kw.setdefault("serialization", "per-resource")
        driver = DacDriver(self.state_dir, self.uid, self.gid, [str(self.root)], **kw)
        self.drivers.append(driver)
        return driver

    def image(
        self, name: str, mode: int = 0o640, uid: int = ORIGINAL_UID, gid: int = ORIGINAL_GID, where: Path | None = None
    ) -> str:
        path = (where or self.root) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 4096)
        os.chown(path, uid, gid)
        os.chmod(path, mode)
        return str(path)

    def make_immutable(self, path: str) -> None:
        subprocess.run(["chattr", "+i", path], check=True)
        self.immutable.append(Path(path))

    def cleanup(self) -> None:
        for path in self.immutable:
            subprocess.run(["chattr", "-i", str(path)], check=False)
        for driver in self.drivers:
            for dom in driver.domains():
                driver.restore(dom)
            driver.recover()


@pytest.fixture
def lab(tmp_path, guest_ids):
    lab = Lab(tmp_path, guest_ids)
    yield lab
    lab.cleanup()


def owner_and_mode(path: str) -> tuple[int, int, int]:
    st = os.stat(path, follow_symlinks=False)
    return st.st_uid, st.st_gid, st.st_mode & 0o7777
