"""DAC labelling: chown a domain's files to the guest user, remember and restore their owners."""

import contextlib
import errno
import json
import logging
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from virtbroker.common.domxml import normalize_uuid
from virtbroker.common.errors import ConfigError, SecurityError
from virtbroker.common.resources import Resource
from virtbroker.workers.security.locks import PathLocks
from virtbroker.workers.security.store import PHASE_ROLLED_BACK, SecurityStore

log = logging.getLogger(__name__)

DRIVER = "dac"
# The original owner and mode travel with the inode, like libvirt's
# trusted.libvirt.security.* attributes; trusted.* is readable and writable by root only.
XATTR_NAME = "trusted.virtbroker.dac"
JOURNAL_KEEP_S = 7 * 24 * 3600.0
# setxattr() errors after which the record goes to the store instead: no trusted.* xattrs
# on this filesystem (NFS, ramfs), or no room for one more attribute on this inode
# (ext4 keeps every xattr of an inode in one block: ENOSPC; others say E2BIG or ERANGE).
_NO_XATTR_ERRNOS = (errno.ENOTSUP, errno.EOPNOTSUPP)
_XATTR_FULL_ERRNOS = (errno.ENOSPC, errno.E2BIG, errno.ERANGE, errno.EDQUOT)
_SET_ID_BITS = stat.S_ISUID | stat.S_ISGID

# One owner record, in the xattr or in the store; every field a non-negative int:
#   uid, gid, mode   what the file had before its first label (restored, less set-id bits)
#   dev, ino         which file it is: a record is applied to that inode only
#   label_uid/gid    the owner the label gave it: a file owned by someone else since is left alone
#   refs             how many domains hold it (recomputed from the store's dac_refs rows)
# A count, not a list of domains: the record stays the same size with any number of
# guests sharing a base image (a list outgrew the inode's xattr space at about a hundred).
RECORD_FIELDS = ("uid", "gid", "mode", "dev", "ino", "label_uid", "label_gid", "refs")
_MAX_ID = 0xFFFFFFFE  # (uid_t) -1 means "unchanged" to chown(), never an owner
_RECORD_LIMITS = {"uid": _MAX_ID, "gid": _MAX_ID, "label_uid": _MAX_ID, "label_gid": _MAX_ID, "mode": 0o7777}


@dataclass
class _Target:
    path: str  # resolved: no symlink in any component
    readonly: bool
    kind: str


def parse_record(raw: bytes | str, path: str, where: str) -> dict:
    """A record read back from an xattr or the store, checked field by field.

    Anything unexpected is a SecurityError naming the file: root wrote the record, so a
    bad one means corruption, a foreign tool or an older format, and acting on a guess
    could hand a file to the wrong owner.
    """
    source = f"its {XATTR_NAME} attribute" if where == "xattr" else "its owner record in the security store"
    fix = "check the file's owner and mode by hand, then remove the record"
    shown = raw[:80]
    try:
        record = json.loads(raw)
    except ValueError:  # UnicodeDecodeError included
        raise SecurityError(f"{path}: {source} is not a valid record ({shown!r}); {fix}") from None
    if not isinstance(record, dict) or set(record) != set(RECORD_FIELDS):
        raise SecurityError(
            f"{path}: {source} is not a valid record (expected the fields {', '.join(RECORD_FIELDS)}, "
            f"found {shown!r}); {fix}"
        )
    for key in RECORD_FIELDS:
        value = record[key]
        # bool is an int to Python, never to a record.
        if type(value) is not int or value < 0 or value > _RECORD_LIMITS.get(key, 2**64 - 1):
            raise SecurityError(f"{path}: {source} has an invalid {key} ({value!r}); {fix}")
    return record


def check_storage_root(root: str) -> str:
    """A storage root as both drivers take it: absolute, an existing directory, not '/';
    returned resolved (no symlink in it)."""
    if not os.path.isabs(root):
        raise ConfigError(f"storage root {root!r} is not an absolute path")
    real = os.path.realpath(root)
    if real == "/":
        raise ConfigError("'/' cannot be a storage root: it would give guests any file of the host")
    if not os.path.isdir(real):
        raise ConfigError(f"storage root {root!r} is not a directory")
    return real


class DacDriver:
    """Labels host files for one guest uid:gid, with a journal so a crash is undone by recover().

    A file's first reference records its original uid, gid and mode, and which file it
    is (st_dev, st_ino), then chowns it to the guest; every reference is a row in the
    store (dac_refs) naming the domain and the file; the last restore puts the original
    owner back, on that same inode only. Each label() is one transaction: journalled
    before any file is touched, rolled back completely on the first failure.

    A restore never sets set-uid or set-gid bits, and leaves alone (logging why) a file
    that is no longer the one labelled, is now hard-linked, resolves outside the roots
    or was given another owner meanwhile: the guest owned the file and perhaps its
    directory, so anything it could have changed is not trusted.

    Callers must not run label() and restore() for the same domain at the same time
    (the broker's per-domain queue already orders them); any number of domains may be
    labelled concurrently, sharing files or not.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike,
        uid: int,
        gid: int,
        storage_roots: list[str],
        serialization: str = "per-resource",
        *,
        force_store: bool = False,
        pause_after_each_s: float = 0.0,
    ):
        self.uid = uid
        self.gid = gid
        self.roots = [check_storage_root(r) for r in storage_roots]
        if not self.roots:
            raise ConfigError("the DAC driver needs at least one storage root")
        self.store = SecurityStore(state_dir)
        self.locks = PathLocks(os.path.join(os.fspath(state_dir), "locks"), serialization)
        # Keep owner records in the store even where trusted.* xattrs work (tests, and
        # filesystems that accept xattrs but lose them, such as some network mounts).
        self.force_store = force_store
        # Test hook for crash tests: sleep after each file labelled, so that a test can
        # kill the process in the middle of a transaction.
        self.pause_after_each_s = pause_after_each_s

    # -- public API --

    def label(self, domain_uuid: str, resources: list[Resource]) -> list[str]:
        """Label every resource for the domain; returns the resolved paths it now holds.

        Raises SecurityError, with nothing changed, if any path is outside the storage
        roots, missing or hard-linked, if a file's owner record is corrupt, or if labelling
        one file fails (the files labelled before it are rolled back).
        """
        dom = normalize_uuid(domain_uuid)
        if any(txn.op == "restore" for txn in self.store.pending(DRIVER, dom)):
            # Some of its files may be given back and others not: finish that first.
            raise SecurityError(f"domain {dom} has an unfinished restore; restore it before labelling again")
        targets = self._resolve(resources)
        held = set(self.store.domain_paths(DRIVER, dom))
        new = [t for t in targets if t.path not in held]
        if new:
            self._label_new(dom, new)
        return [t.path for t in targets]

    def restore(self, domain_uuid: str) -> list[str]:
        """Drop the domain's references, giving files whose last reference this was back.

        Idempotent; also undoes an unfinished label() of this domain. Returns the paths
        whose reference was dropped (a file left alone for a reason it logs included).
        On failure the restore stays in the journal, and recover() or a later restore()
        finishes it.
        """
        dom = normalize_uuid(domain_uuid)
        paths = set(self.store.domain_paths(DRIVER, dom))
        paths.update(self.store.ref_paths(dom))
        pending = self.store.pending(DRIVER, dom)
        for txn in pending:
            paths.update(txn.paths)
        if not paths and not pending:
            return []
        ordered = sorted(paths)
        with self._transaction_scope(ordered):
            txn_id = self.store.begin(DRIVER, dom, "restore", ordered)
            dropped, failures = self._drop_all(dom, ordered)
            if failures:
                raise SecurityError(f"cannot restore {_describe(failures)}; will retry on recovery")
            self.store.commit_restore(txn_id, DRIVER, dom, ordered)
        return dropped

    def recover(self) -> list[str]:
        """Undo every unfinished transaction (called at startup, after a crash).

        Returns the paths whose reference an interrupted domain held and now dropped. A
        failure is logged and its journal entry stays pending for the next recovery.
        """
        restored: list[str] = []
        for txn in self.store.pending(DRIVER):
            paths = list(txn.paths)
            if txn.op == "label":
                # A later committed label() of the same domain may have taken over a path.
                held = set(self.store.domain_paths(DRIVER, txn.domain_uuid))
                paths = [p for p in paths if p not in held]
            with self._transaction_scope(paths):
                dropped, failures = self._drop_all(txn.domain_uuid, paths)
                if failures:
                    log.error("recovery of %s of domain %s failed: %s", txn.op, txn.domain_uuid, _describe(failures))
                    continue
                if txn.op == "label":
                    # PENDING -> ROLLED_BACK (crashed mid-label)
                    self.store.finish(txn.txn_id, PHASE_ROLLED_BACK)
                else:
                    # PENDING -> COMMITTED (crashed mid-restore, now finished)
                    self.store.commit_restore(txn.txn_id, DRIVER, txn.domain_uuid, paths)
            log.info("recovered %s of domain %s: %d path(s) restored", txn.op, txn.domain_uuid, len(dropped))
            restored.extend(dropped)
        self.store.prune(time.time() - JOURNAL_KEEP_S)
        return restored

    def labelled(self, domain_uuid: str) -> list[str]:
        """The resolved paths a committed label() gave this domain."""
        return self.store.domain_paths(DRIVER, normalize_uuid(domain_uuid))

    def domains(self) -> list[str]:
        """Every domain that holds at least one labelled path."""
        return self.store.domains(DRIVER)

    # -- checks, before anything is touched --

    def _under_roots(self, real: str) -> bool:
        # Strictly below a root: chowning the root itself would hand every image to the guest.
        return any(real.startswith(root + "/") for root in self.roots)

    def _resolve(self, resources: list[Resource]) -> list[_Target]:
        targets: dict[str, _Target] = {}
        for res in resources:
            if not res.path.startswith("/") or "\0" in res.path:
                raise SecurityError(f"refusing {res.kind} path {res.path!r}: not an absolute path")
            # Resolved once; from here on only the resolved path is used, and _open()
            # checks that it still names the same file when it is touched.
            real = os.path.realpath(res.path)
            if not self._under_roots(real):
                raise SecurityError(
                    f"refusing {res.kind} path {res.path!r}: it resolves to {real!r}, "
                    f"outside the storage roots {', '.join(self.roots)}"
                )
            try:
                st = os.lstat(real)
            except FileNotFoundError:
                if res.may_be_absent:
                    continue  # QEMU creates it (a listening socket); nothing to label yet
                raise SecurityError(f"refusing {res.kind} path {res.path!r}: {real!r} does not exist") from None
            _check_labelable(real, st)
            old = targets.get(real)
            if old is None:
                targets[real] = _Target(real, res.readonly, res.kind)
            elif old.readonly and not res.readonly:
                targets[real] = _Target(real, False, res.kind)
        return list(targets.values())

    # -- the transaction --

    def _transaction_scope(self, paths: list[str]):
        """global: one host-wide lock for the whole transaction, as libvirt's security manager.
        per-resource: nothing here; each file is locked only while its own record changes."""
        return self.locks.locked(paths) if self.locks.mode == "global" else contextlib.nullcontext()

    def _file_scope(self, path: str):
        return self.locks.locked([path]) if self.locks.mode != "global" else contextlib.nullcontext()

    def _label_new(self, dom: str, targets: list[_Target]) -> None:
        paths = [t.path for t in targets]
        with self._transaction_scope(paths):
            # Durable before the first chown: a crash from here on is undone by recover().
            # The journal is per domain, and the broker runs one job per domain at a time,
            # so it needs no file lock; the fsyncs it costs are outside every file's lock.
            txn_id = self.store.begin(DRIVER, dom, "label", paths)
            tried: list[str] = []
            for target in targets:
                tried.append(target.path)
                try:
                    with self._file_scope(target.path):
                        self._add_ref(target, dom)
                except Exception as e:
                    self._roll_back(txn_id, dom, tried, target.path, e)
                if self.pause_after_each_s:
                    time.sleep(self.pause_after_each_s)
            # PENDING -> COMMITTED
            self.store.commit_label(txn_id, DRIVER, dom, paths)

    def _roll_back(self, txn_id: int, dom: str, tried: list[str], failed_path: str, cause: Exception) -> None:
        # Only paths with a dac_refs row of this domain are touched by _drop_ref.
        _, failures = self._drop_all(dom, list(reversed(tried)))
        reason = _os_reason(cause)
        if failures:
            # The journal entry stays PENDING, so recover() retries the rollback.
            raise SecurityError(
                f"cannot label {failed_path}: {reason}; rolling back also failed for {_describe(failures)}"
            ) from cause
        # PENDING -> ROLLED_BACK
        self.store.finish(txn_id, PHASE_ROLLED_BACK)
        raise SecurityError(f"cannot label {failed_path}: {reason}") from cause

    def _drop_all(self, dom: str, paths: list[str]) -> tuple[list[str], list[tuple[str, Exception]]]:
        dropped: list[str] = []
        failures: list[tuple[str, Exception]] = []
        for path in paths:
            try:
                with self._file_scope(path):
                    if self._drop_ref(path, dom):
                        dropped.append(path)
            except Exception as e:  # keep going: restore as much as possible
                failures.append((path, e))
        return dropped, failures

    # -- one file --

    @contextmanager
    def _open(self, path: str) -> Iterator[tuple[os.stat_result, str, str]]:
        """An O_PATH descriptor of exactly `path`: its stat, a /proc path that acts on its
        inode, and the path the kernel names it by now.

        Working through the descriptor, not the name, closes the window in which a
        component could be swapped for a symlink between our check and our chown.
        """
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            proc_path = f"/proc/self/fd/{fd}"
            yield os.fstat(fd), proc_path, os.readlink(proc_path)
        finally:
            os.close(fd)

    @staticmethod
    def _check_still_named(path: str, st: os.stat_result, now_named: str) -> None:
        if stat.S_ISLNK(st.st_mode):
            raise SecurityError(f"{path} became a symbolic link")
        if now_named != path:
            raise SecurityError(f"{path} was moved or replaced while being labelled")

    def _read_record(self, proc_path: str, path: str) -> tuple[dict | None, str | None]:
        if not self.force_store:
            try:
                raw = os.getxattr(proc_path, XATTR_NAME)
            except OSError as e:
                if e.errno != errno.ENODATA and e.errno not in _NO_XATTR_ERRNOS:
                    raise
            else:
                return parse_record(raw, path, "xattr"), "xattr"
        # Also consulted when xattrs work: the record may date from a force_store driver,
        # or have moved to the store when the inode had no room left for it.
        stored = self.store.get_owner(path)
        return (parse_record(stored, path, "store"), "store") if stored is not None else (None, None)

    def _write_record(self, proc_path: str, path: str, record: dict, where: str | None) -> str:
        if where == "xattr" or (where is None and not self.force_store):
            try:
                os.setxattr(proc_path, XATTR_NAME, json.dumps(record, sort_keys=True).encode())
                return "xattr"
            except OSError as e:
                if e.errno not in _NO_XATTR_ERRNOS + _XATTR_FULL_ERRNOS:
                    raise
                if where == "xattr":
                    # It was there a moment ago: the inode's xattr space is full. Move the
                    # record to the store; the store's copy is durable before the xattr goes.
                    log.warning("%s: no room for %s any more (%s); keeping its record in the store",
                                path, XATTR_NAME, e.strerror)
                    self.store.put_owner(path, record)
                    self._delete_record(proc_path, path, "xattr")
                    return "store"
                log.debug("%s: cannot keep %s (%s), remembering the owner in the store", path, XATTR_NAME, e.strerror)
        self.store.put_owner(path, record)
        return "store"

    def _delete_record(self, proc_path: str, path: str, where: str) -> None:
        if where == "xattr":
            try:
                os.removexattr(proc_path, XATTR_NAME)
            except OSError as e:
                if e.errno != errno.ENODATA:
                    raise
        else:
            self.store.delete_owner(path)

    def _add_ref(self, target: _Target, dom: str) -> None:
        path = target.path
        with self._open(path) as (st, proc_path, now_named):
            self._check_still_named(path, st, now_named)
            _check_labelable(path, st)
            ident = (st.st_dev, st.st_ino)
            # Read and checked before anything changes: a corrupt record refuses the label.
            record, where = self._read_record(proc_path, path)
            if record is not None and (record["dev"], record["ino"]) != ident:
                raise SecurityError(
                    f"refusing {path}: its owner record is for another file (inode {record['dev']}:{record['ino']}, "
                    f"this is {ident[0]}:{ident[1]}); it was replaced while labelled: "
                    "restore the domains using it first"
                )
            if record is not None and (record["label_uid"], record["label_gid"]) != (self.uid, self.gid):
                raise SecurityError(
                    f"refusing {path}: it is labelled for {record['label_uid']}:{record['label_gid']}, "
                    f"not {self.uid}:{self.gid}"
                )
            # The reference is durable before the record changes: from here on a rollback
            # or a recovery finds it and drops it.
            stale = self.store.add_ref(dom, path, *ident)
            if stale is not None:
                raise SecurityError(
                    f"refusing {path}: domain {dom} still holds the file that was here before "
                    f"(inode {stale[0]}:{stale[1]}); restore the domain first"
                )
            refs = self.store.count_refs(*ident)
            if record is None:
                record = {
                    "uid": st.st_uid, "gid": st.st_gid, "mode": stat.S_IMODE(st.st_mode),
                    "dev": ident[0], "ino": ident[1], "label_uid": self.uid, "label_gid": self.gid, "refs": refs,
                }
                # Remembered before the first change, so the original owner is never lost.
                self._write_record(proc_path, path, record, None)
            elif record["refs"] != refs:
                record["refs"] = refs
                self._write_record(proc_path, path, record, where)
            self._grant(proc_path, st, target)

    def _grant(self, proc_path: str, st: os.stat_result, target: _Target) -> None:
        if (st.st_uid, st.st_gid) != (self.uid, self.gid):
            os.chown(proc_path, self.uid, self.gid)
        # Owner bits only: the guest owns the file now. Later references only ever add
        # bits (a read-write user after a read-only one); the last restore resets all.
        needed = stat.S_IRUSR
        if not target.readonly:
            needed |= stat.S_IWUSR
        if stat.S_ISDIR(st.st_mode):
            needed |= stat.S_IXUSR
        # chown() clears set-id bits, so read the mode again rather than trusting `st`.
        mode_now = stat.S_IMODE(os.stat(proc_path).st_mode)
        if mode_now & needed != needed:
            os.chmod(proc_path, mode_now | needed)

    def _why_not_restorable(self, path: str, st: os.stat_result, now_named: str, ident: tuple[int, int]) -> str | None:
        """Why the file at `path` must not be given back, or None: the checks of label time,
        made again, and that it is still the very file that was labelled."""
        if (st.st_dev, st.st_ino) != ident:
            return (
                f"it is not the file that was labelled (inode {st.st_dev}:{st.st_ino}, "
                f"labelled {ident[0]}:{ident[1]}): "
                "it was moved or replaced"
            )
        if stat.S_ISLNK(st.st_mode):
            return "it is now a symbolic link"
        if now_named != path:
            return f"it is now reached as {now_named!r}"
        if not self._under_roots(now_named):
            return f"it is now outside the storage roots {', '.join(self.roots)}"
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            return f"it now has {st.st_nlink} hard links"
        return None

    def _drop_ref(self, path: str, dom: str) -> bool:
        ident = self.store.get_ref(dom, path)
        if ident is None:
            return False  # never referenced (the label failed before), or already dropped
        with contextlib.ExitStack() as stack:
            try:
                st, proc_path, now_named = stack.enter_context(self._open(path))
            except FileNotFoundError:
                # The file is gone (an overlay deleted after shutdown): nothing to give back.
                self.store.drop_ref(dom, path, forget_owner_of=ident)
                return False
            why = self._why_not_restorable(path, st, now_named, ident)
            if why is not None:
                # The journal entry still finishes: holding on would retry for ever.
                log.warning("domain %s lets go of %s without giving it back: %s", dom, path, why)
                self.store.drop_ref(dom, path, forget_owner_of=ident)
                return True
            record, where = self._read_record(proc_path, path)
            if record is None:
                # The label stopped between taking the reference and writing the record,
                # so it never changed the file.
                self.store.drop_ref(dom, path)
                return True
            if (record["dev"], record["ino"]) != ident:
                log.warning("domain %s lets go of %s without giving it back: its record is for inode %d:%d",
                            dom, path, record["dev"], record["ino"])
                self.store.drop_ref(dom, path)
                return True
            remaining = self.store.count_refs(*ident) - 1  # less this domain's own row
            if remaining > 0:
                if record["refs"] != remaining:
                    record["refs"] = remaining
                    self._write_record(proc_path, path, record, where)
                self.store.drop_ref(dom, path)
                return True
            # Owner and mode first, the record after, the reference last: a crash in
            # between repeats only what is left.
            self._give_back(path, proc_path, st, record, dom)
            self._delete_record(proc_path, path, where)
            self.store.drop_ref(dom, path, forget_owner_of=ident)
            return True

    def _give_back(self, path: str, proc_path: str, st: os.stat_result, record: dict, dom: str) -> None:
        """The last reference: the original owner and mode, never a set-id bit."""
        original = (record["uid"], record["gid"])
        # A crash after the chown below and before the record was deleted finds the
        # original owner already back: finish. Any other owner was set by someone else
        # since the label (an administrator, or the file is not ours): leave it.
        if (st.st_uid, st.st_gid) not in ((record["label_uid"], record["label_gid"]), original):
            log.warning("domain %s lets go of %s without giving it back: it is owned by %d:%d, not %d:%d as labelled",
                        dom, path, st.st_uid, st.st_gid, record["label_uid"], record["label_gid"])
            return
        # A set-id bit came from the guest's time with the file or from before it: chown()
        # cleared the original's, and giving one back would make whatever the guest wrote
        # into the file run as its original owner.
        mode = record["mode"] & ~_SET_ID_BITS
        if (st.st_uid, st.st_gid) != original:
            os.chown(proc_path, *original)
        if stat.S_IMODE(os.stat(proc_path).st_mode) != mode:
            os.chmod(proc_path, mode)
        if record["mode"] & _SET_ID_BITS:
            log.info("%s: given back as %04o without the set-id bits of its original mode %04o",
                     path, mode, record["mode"])


def _check_labelable(path: str, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise SecurityError(f"refusing {path}: it is a symbolic link")
    # A second name for a regular file may sit outside the roots (a hard link to
    # /etc/shadow made inside a root); realpath() cannot see that, so refuse them all.
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        raise SecurityError(f"refusing {path}: it has {st.st_nlink} hard links")


def _os_reason(e: Exception) -> str:
    if isinstance(e, SecurityError):
        return e.message
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _describe(failures: list[tuple[str, Exception]]) -> str:
    return "; ".join(f"{path}: {_os_reason(e)}" for path, e in failures)
