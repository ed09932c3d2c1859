"""AppArmor confinement: one generated profile per domain, as libvirt's virt-aa-helper writes them."""

import logging
import os
import re
import shutil
import subprocess
import time

from common.domxml import check_name, normalize_uuid
from common.errors import ConfigError, SecurityError
from common.resources import Resource
from workers.security.locks import PathLocks
from workers.security.store import PHASE_ROLLED_BACK, Profile, SecurityStore

log = logging.getLogger(__name__)

DRIVER = "apparmor"
PROFILE_PREFIX = "virtbroker-"
APPARMOR_FS = "/sys/kernel/security/apparmor"
ABSTRACTIONS_DIR = "/etc/apparmor.d/abstractions"
PARSER_TIMEOUT_S = 60.0

# A path goes into the profile as a double-quoted string. Rather than escape, refuse
# every character that could end the string or the rule (" \ , newline, CR, NUL, any
# other control character) or that AppArmor reads as a pattern inside quotes
# (* ? [ ] { } ^ and @{ variables): a refused path is a clear error, an escaped one a
# subtle bug. virt-aa-helper refuses the same set in domain names.
_FORBIDDEN_CHARS = frozenset('",\\*?[]{}^') | frozenset(chr(c) for c in range(32)) | {"\x7f"}
_ABSTRACTION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")

# Permissions per resource kind, after virt-aa-helper's get_files(): "k" lets QEMU
# lock image files; kernel, initrd and dtb are only read.
_READONLY_PERMS = {"kernel": "r", "initrd": "r", "dtb": "r", "acpi": "r"}
_READWRITE_PERMS = {"serial": "rw", "console": "rw", "channel": "rw", "parallel": "rw", "tpm": "rw", "input": "rw"}
EMULATOR_PERMS = "rmix"  # what libvirt's libvirt-qemu abstraction grants QEMU binaries


def _find_parser() -> str:
    for candidate in (shutil.which("apparmor_parser"), "/sbin/apparmor_parser", "/usr/sbin/apparmor_parser"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError("apparmor_parser not found (install the apparmor package)")


def check_rule_path(path: str, what: str) -> str:
    """Return the path if it can be quoted into a profile as is; raise SecurityError otherwise."""
    if not path.startswith("/"):
        raise SecurityError(f"refusing {what} path {path!r}: not absolute")
    bad = sorted({c for c in path if c in _FORBIDDEN_CHARS})
    if bad or "@{" in path:
        shown = ", ".join(repr(c) for c in bad) or "'@{'"
        raise SecurityError(
            f"refusing {what} path {path!r}: it contains {shown}, which AppArmor would not read literally"
        )
    return path


def _perms(res: Resource) -> str:
    if res.kind in _READONLY_PERMS:
        return _READONLY_PERMS[res.kind]
    if res.kind in _READWRITE_PERMS:
        return _READWRITE_PERMS[res.kind]
    return "rk" if res.readonly else "rwk"


class AppArmorDriver:
    """Writes, compiles (and, on an AppArmor kernel, loads) `virtbroker-<uuid>` profiles.

    On a kernel without AppArmor the profile is only compiled (`apparmor_parser -Q -K`),
    which still proves it is valid. Same concurrency contract as DacDriver: one
    operation per domain at a time, any number of domains in parallel.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike,
        profile_dir: str | os.PathLike,
        serialization: str = "per-resource",
        parser: str | None = None,
        *,
        abstraction: str | None = None,
        pause_after_write_s: float = 0.0,
    ):
        self.profile_dir = os.fspath(profile_dir)
        os.makedirs(self.profile_dir, mode=0o755, exist_ok=True)
        self.parser = parser or _find_parser()
        if abstraction is None:
            # libvirt's own abstraction when libvirt's AppArmor files are installed.
            have_libvirt = os.path.exists(os.path.join(ABSTRACTIONS_DIR, "libvirt-qemu"))
            abstraction = "libvirt-qemu" if have_libvirt else "base"
        if not _ABSTRACTION_RE.match(abstraction) or ".." in abstraction:
            raise ConfigError(f"bad AppArmor abstraction name {abstraction!r}")
        self.abstraction = abstraction
        self.store = SecurityStore(state_dir)
        self.locks = PathLocks(os.path.join(os.fspath(state_dir), "locks"), serialization)
        # Test hook for crash tests: sleep after writing the profile, before compiling.
        self.pause_after_write_s = pause_after_write_s

    # -- public API --

    @staticmethod
    def profile_name(domain_uuid: str) -> str:
        return PROFILE_PREFIX + normalize_uuid(domain_uuid)

    def profile_path(self, domain_uuid: str) -> str:
        return os.path.join(self.profile_dir, self.profile_name(domain_uuid))

    @staticmethod
    def kernel_has_apparmor() -> bool:
        return os.path.isdir(APPARMOR_FS)

    def label(self, domain_uuid: str, domain_name: str, resources: list[Resource], emulator: str | None) -> str:
        """Generate, compile (and load) the domain's profile; returns the profile name.

        Raises SecurityError, leaving no new profile file behind, for a path that could
        not be quoted safely or a profile apparmor_parser rejects. Calling it again for
        the same domain replaces the profile (after a hotplug, say).
        """
        dom = normalize_uuid(domain_uuid)
        check_name(domain_name)
        name = self.profile_name(dom)
        text = self.render(dom, domain_name, resources, emulator)
        final = self.profile_path(dom)
        tmp = self._tmp_path(dom)
        with self.locks.locked([final]):
            txn_id = self.store.begin(DRIVER, dom, "label", [final])
            try:
                loaded = self._install(text, tmp, final)
            except Exception as e:
                _unlink(tmp)
                # PENDING -> ROLLED_BACK
                self.store.finish(txn_id, PHASE_ROLLED_BACK)
                if isinstance(e, SecurityError):
                    raise
                raise SecurityError(f"cannot install profile {name}: {e}") from e
            # PENDING -> COMMITTED
            self.store.commit_profile(txn_id, Profile(dom, name, final, loaded))
        return name

    def restore(self, domain_uuid: str) -> str | None:
        """Unload (when loaded) and delete the domain's profile; returns its name, or None if none."""
        dom = normalize_uuid(domain_uuid)
        final = self.profile_path(dom)
        profile = self.store.get_profile(dom)
        pending = self.store.pending(DRIVER, dom)
        if profile is None and not pending and not os.path.lexists(final):
            return None
        with self.locks.locked([final]):
            txn_id = self.store.begin(DRIVER, dom, "restore", [final])
            self._remove(dom, unload=profile is None or profile.loaded)
            self.store.commit_profile_removal(txn_id, dom)
        return self.profile_name(dom)

    def recover(self) -> list[str]:
        """Clean up after transactions a crash interrupted; returns the profile files removed."""
        removed: list[str] = []
        for txn in self.store.pending(DRIVER):
            final = self.profile_path(txn.domain_uuid)
            with self.locks.locked([final]):
                committed = self.store.get_profile(txn.domain_uuid)
                try:
                    if txn.op == "label" and committed is not None:
                        # An interrupted re-label: the committed profile is still the valid one.
                        _unlink(self._tmp_path(txn.domain_uuid))
                        # PENDING -> ROLLED_BACK
                        self.store.finish(txn.txn_id, PHASE_ROLLED_BACK)
                        continue
                    existed = os.path.lexists(final) or os.path.lexists(self._tmp_path(txn.domain_uuid))
                    self._remove(txn.domain_uuid, unload=committed is None or committed.loaded)
                except Exception as e:
                    log.error("recovery of %s of domain %s failed: %s", txn.op, txn.domain_uuid, e)
                    continue
                if txn.op == "label":
                    # PENDING -> ROLLED_BACK
                    self.store.finish(txn.txn_id, PHASE_ROLLED_BACK)
                else:
                    # PENDING -> COMMITTED
                    self.store.commit_profile_removal(txn.txn_id, txn.domain_uuid)
                if existed:
                    removed.append(final)
        return removed

    def profiles(self) -> list[Profile]:
        return self.store.profiles()

    def render(self, domain_uuid: str, domain_name: str, resources: list[Resource], emulator: str | None) -> str:
        """The profile text; every path checked by check_rule_path() first."""
        dom = normalize_uuid(domain_uuid)
        check_name(domain_name)
        rules: list[str] = []
        if emulator:
            check_rule_path(emulator, "emulator")
            rules.append(f'  "{check_rule_path(os.path.realpath(emulator), "emulator")}" {EMULATOR_PERMS},')
        for res in self._merged(resources):
            if os.path.isdir(res.path):
                # A directory (filesystem passthrough, vvfat floppy): the tree below it.
                rules.append(f'  "{res.path}/" r,')
                rules.append(f'  "{res.path}/**" {"r" if res.readonly else "rwk"},')
            else:
                rules.append(f'  "{res.path}" {_perms(res)},')
        return "\n".join(
            [
                f"# virtbroker profile for domain {domain_name} ({dom}). Generated; do not edit.",
                "#include <tunables/global>",
                "",
                f"profile {self.profile_name(dom)} flags=(attach_disconnected) {{",
                f"  #include <abstractions/{self.abstraction}>",
                "",
                *rules,
                "}",
                "",
            ]
        )

    # -- internals --

    @staticmethod
    def _merged(resources: list[Resource]) -> list[Resource]:
        # AppArmor mediates the resolved path, so rules name it, as virt-aa-helper does;
        # both spellings are checked, so a safe link cannot smuggle in an unsafe target.
        by_path: dict[str, Resource] = {}
        for res in resources:
            check_rule_path(res.path, res.kind)
            real = check_rule_path(os.path.realpath(res.path), res.kind)
            old = by_path.get(real)
            if old is None or (old.readonly and not res.readonly):
                by_path[real] = Resource(real, res.readonly, res.shared, res.kind, res.may_be_absent)
        return list(by_path.values())

    def _tmp_path(self, dom: str) -> str:
        # A dot file: AppArmor's boot-time loader skips it if a crash leaves it behind.
        return os.path.join(self.profile_dir, f".{self.profile_name(dom)}.tmp")

    def _install(self, text: str, tmp: str, final: str) -> bool:
        """Write, check and move the profile into place; load it when the kernel can. True if loaded."""
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if self.pause_after_write_s:
            time.sleep(self.pause_after_write_s)
        # Checked under its temporary name so a rejected profile never replaces a good one.
        self._run_parser(["-Q", "-K"], tmp)
        os.replace(tmp, final)
        _fsync_dir(self.profile_dir)
        if not self.kernel_has_apparmor():
            return False
        try:
            # Loaded under its final name: the parser names cache files after the file.
            self._run_parser(["-r", "-W"], final)
        except SecurityError:
            _unlink(final)
            raise
        return True

    def _remove(self, dom: str, unload: bool) -> None:
        final = self.profile_path(dom)
        if unload and self.kernel_has_apparmor() and os.path.exists(final):
            self._run_parser(["-R"], final)
        _unlink(self._tmp_path(dom))
        _unlink(final)
        _fsync_dir(self.profile_dir)

    def _run_parser(self, args: list[str], path: str) -> None:
        try:
            proc = subprocess.run(
                [self.parser, *args, path], capture_output=True, text=True, timeout=PARSER_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SecurityError(f"cannot run {self.parser}: {e}") from e
        if proc.returncode != 0:
            lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
            # The parser prints warnings (no cache on this kernel...) before the error.
            errors = [ln for ln in lines if "error" in ln.lower()]
            detail = (errors or lines or [f"exit status {proc.returncode}"])[-1]
            raise SecurityError(f"apparmor_parser {' '.join(args)} failed for {os.path.basename(path)}: {detail}")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
