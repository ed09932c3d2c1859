"""AppArmor confinement: one generated profile per domain, as libvirt's virt-aa-helper writes them."""

import logging
import os
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass

from virtbroker.common.domxml import check_name, normalize_uuid
from virtbroker.common.errors import ConfigError, SecurityError
from virtbroker.common.resources import Resource
from virtbroker.workers.security.dac import check_storage_root
from virtbroker.workers.security.locks import PathLocks
from virtbroker.workers.security.store import PHASE_ROLLED_BACK, Profile, SecurityStore

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


def _check_allowed_emulator(path: str) -> str:
    if not os.path.isabs(path):
        raise ConfigError(f"allowed emulator {path!r} is not an absolute path")
    try:
        return check_rule_path(os.path.realpath(check_rule_path(path, "allowed emulator")), "allowed emulator")
    except SecurityError as e:
        raise ConfigError(e.message) from None


def _check_labelable(path: str, st: os.stat_result) -> None:
    """The checks DAC's _check_labelable makes, for the same reasons."""
    if stat.S_ISLNK(st.st_mode):
        # realpath() left none, so a component was swapped for a link meanwhile.
        raise SecurityError(f"refusing {path}: it is a symbolic link")
    # AppArmor mediates the name a file is opened by, not its inode: a hard link to
    # /etc/shadow made inside a root would pass the rule written for that name, and
    # realpath() cannot see it. Refuse every second name, as DAC does.
    # Differs from DAC in one way this cannot close: DAC changes the inode it checked,
    # so replacing the file afterwards gains nothing, but a rule keeps naming the path,
    # so whoever can write the root's directories can later put a hard link in the
    # named file's place (fs.protected_hardlinks stops users linking files they do not
    # own; root is not stopped). Such writers must be trusted as much as the profiles.
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        raise SecurityError(f"refusing {path}: it has {st.st_nlink} hard links")


@dataclass(frozen=True)
class _Target:
    path: str  # resolved: no symlink in any component; checked by check_rule_path()
    readonly: bool
    kind: str
    directory: bool


def _perms(target: _Target) -> str:
    if target.kind in _READONLY_PERMS:
        return _READONLY_PERMS[target.kind]
    if target.kind in _READWRITE_PERMS:
        return _READWRITE_PERMS[target.kind]
    return "rk" if target.readonly else "rwk"


class AppArmorDriver:
    """Writes, compiles (and, on an AppArmor kernel, loads) `virtbroker-<uuid>` profiles.

    On a kernel without AppArmor the profile is only compiled (`apparmor_parser -Q -K`),
    which still proves it is valid. Same concurrency contract as DacDriver: one
    operation per domain at a time, any number of domains in parallel.

    Same path policy as DacDriver: a profile grants only paths that resolve strictly
    below a storage root (never a root itself, never '/'), that exist (unless QEMU
    creates them), and that are not hard-linked files; the emulator must resolve to
    one of allowed_emulators. A refused label() writes neither profile nor journal entry.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike,
        profile_dir: str | os.PathLike,
        storage_roots: list[str],
        allowed_emulators: list[str],
        serialization: str = "per-resource",
        *,
        pause_after_write_s: float = 0.0,
    ):
        self.roots = [check_storage_root(r) for r in storage_roots]
        if not self.roots:
            raise ConfigError("the AppArmor driver needs at least one storage root")
        # Resolved once, like the roots. Empty: no <emulator> is accepted (a domain that
        # names none still gets a profile, without an emulator rule).
        self.emulators = sorted({_check_allowed_emulator(e) for e in allowed_emulators})
        self.profile_dir = os.fspath(profile_dir)
        os.makedirs(self.profile_dir, mode=0o755, exist_ok=True)
        self.parser = _find_parser()
        # libvirt's own abstraction when libvirt's AppArmor files are installed.
        have_libvirt = os.path.exists(os.path.join(ABSTRACTIONS_DIR, "libvirt-qemu"))
        self.abstraction = "libvirt-qemu" if have_libvirt else "base"
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
        not be quoted safely, a path the storage roots do not allow, an emulator not in
        allowed_emulators, or a profile apparmor_parser rejects; every check but the
        parser's runs before the journal entry is written. Calling it again for the same
        domain replaces the profile (after a hotplug, say); a refused call keeps the old one.
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
        """The profile text; every path checked against the path policy first."""
        dom = normalize_uuid(domain_uuid)
        check_name(domain_name)
        rules: list[str] = []
        if emulator:
            rules.append(f'  "{self._check_emulator(emulator)}" {EMULATOR_PERMS},')
        for target in self._resolve(resources):
            if target.directory:
                # A directory (filesystem passthrough, vvfat floppy): the tree below it.
                # Files in that tree are not checked: a hard link to a file outside the
                # roots, put there at any time, is granted by its name. DAC has no such
                # gap (it chowns the directory only, and QEMU as the guest user still
                # cannot open files it does not own); AppArmor alone does.
                rules.append(f'  "{target.path}/" r,')
                rules.append(f'  "{target.path}/**" {"r" if target.readonly else "rwk"},')
            else:
                rules.append(f'  "{target.path}" {_perms(target)},')
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

    # -- the path policy, checked before anything is written --

    def _check_emulator(self, emulator: str) -> str:
        check_rule_path(emulator, "emulator")
        real = check_rule_path(os.path.realpath(emulator), "emulator")
        if real not in self.emulators:
            allowed = ", ".join(self.emulators) or "none"
            raise SecurityError(
                f"refusing emulator {emulator!r}: it resolves to {real!r}, which is not an allowed emulator "
                f"(allowed: {allowed})"
            )
        return real

    def _check_under_roots(self, res: Resource, real: str) -> None:
        if real == "/":
            raise SecurityError(f"refusing {res.kind} path {res.path!r}: it resolves to '/', the whole host")
        if real in self.roots:
            raise SecurityError(
                f"refusing {res.kind} path {res.path!r}: it resolves to the storage root {real!r} itself; "
                "name a file or directory below it"
            )
        # Strictly below a root, as DAC: the root itself would grant every image in it.
        if not any(real.startswith(root + "/") for root in self.roots):
            raise SecurityError(
                f"refusing {res.kind} path {res.path!r}: it resolves to {real!r}, "
                f"outside the storage roots {', '.join(self.roots)}"
            )

    def _resolve(self, resources: list[Resource]) -> list[_Target]:
        """DAC's _resolve for a profile: resolved, under the roots, merged per resolved path.

        AppArmor mediates the resolved path, so rules name it, as virt-aa-helper does;
        both spellings are checked, so a safe link cannot smuggle in an unsafe target.
        Unlike DAC, nothing is checked again later: the kernel resolves the name at each
        open and matches the result against these rules, so a component swapped for a
        symlink after this check leads QEMU to a path no rule names.

        Device nodes are treated as DAC treats them: allowed when they resolve below a
        root (a /dev/disk/by-id link resolves to /dev/sdX, outside any root, and is refused).
        """
        targets: dict[str, _Target] = {}
        for res in resources:
            check_rule_path(res.path, res.kind)
            real = check_rule_path(os.path.realpath(res.path), res.kind)
            self._check_under_roots(res, real)
            try:
                st = os.lstat(real)
            except FileNotFoundError:
                if not res.may_be_absent:
                    raise SecurityError(f"refusing {res.kind} path {res.path!r}: {real!r} does not exist") from None
                # Differs from DAC, which has nothing to chown yet: QEMU creates this
                # socket after the profile is in force, so the rule must already name it.
                st = None
            except OSError as e:
                raise SecurityError(f"refusing {res.kind} path {res.path!r}: {real!r}: {e.strerror}") from None
            if st is not None:
                _check_labelable(real, st)
            directory = st is not None and stat.S_ISDIR(st.st_mode)
            old = targets.get(real)
            if old is None:
                targets[real] = _Target(real, res.readonly, res.kind, directory)
            elif old.readonly and not res.readonly:
                # Read-write use wins, with its kind, as in DAC.
                targets[real] = _Target(real, False, res.kind, directory)
        return list(targets.values())

    # -- internals --

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
