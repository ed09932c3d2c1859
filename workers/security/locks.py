"""Per-path (or host-wide) locks that serialize labelling across threads and processes."""

import fcntl
import hashlib
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from virtbroker.common.errors import ConfigError

MODES = ("per-resource", "global")
_GLOBAL_KEY = "<global>"


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class PathLocks:
    """`with locks.locked(paths):` holds every path's lock, taken in sorted order.

    Two layers, like libvirt's metadata lock: a threading.Lock per path for the threads
    of this process, then an exclusive flock() on a lock file per path in lock_dir, so
    that every process sharing lock_dir (a second security worker, a worker restarted
    while the old one is still dying) waits too. Lock files, rather than the labelled
    file itself, because sockets cannot be opened, a profile may not exist yet, and
    opening a device node as root can have side effects.

    Sorted order makes two callers that need overlapping sets unable to deadlock. In
    "global" mode every call takes one host-wide lock instead.
    """

    def __init__(self, lock_dir: str | os.PathLike, mode: str = "per-resource"):
        if mode not in MODES:
            raise ConfigError(f"serialization must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.lock_dir = os.fspath(lock_dir)
        os.makedirs(self.lock_dir, mode=0o700, exist_ok=True)
        # Guards only the table below, for the moment of a lookup; never held while waiting.
        self._table_mutex = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def _keys(self, paths: Iterable[str]) -> list[str]:
        if self.mode == "global":
            return [_GLOBAL_KEY]
        # De-duplicated: flock() conflicts between two descriptors of one process, so
        # taking the same path twice would wait for ourselves.
        return sorted(set(paths))

    def _lock_file(self, key: str) -> str:
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        return os.path.join(self.lock_dir, f"{digest}.lock")

    def _acquire_thread(self, key: str) -> _Entry:
        with self._table_mutex:
            entry = self._entries.setdefault(key, _Entry())
            entry.users += 1
        entry.lock.acquire()
        return entry

    def _release_thread(self, key: str, entry: _Entry) -> None:
        entry.lock.release()
        with self._table_mutex:
            entry.users -= 1
            if entry.users == 0:
                del self._entries[key]

    def _acquire_file(self, key: str) -> int:
        path = self._lock_file(key)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            # The holder before us unlinks the file before unlocking (see _release_file);
            # if we locked an inode that is no longer the one at `path`, start over.
            try:
                on_disk = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                os.close(fd)
                continue
            held = os.fstat(fd)
            if (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino):
                return fd
            os.close(fd)

    def _release_file(self, key: str, fd: int) -> None:
        # Unlink while still holding the lock, so lock files do not pile up; waiters
        # notice the unlinked inode and retry on a fresh file.
        try:
            os.unlink(self._lock_file(key))
        finally:
            os.close(fd)

    @contextmanager
    def locked(self, paths: Iterable[str]) -> Iterator[None]:
        held: list[tuple[str, _Entry, int]] = []
        try:
            for key in self._keys(paths):
                entry = self._acquire_thread(key)
                try:
                    fd = self._acquire_file(key)
                except BaseException:
                    self._release_thread(key, entry)
                    raise
                held.append((key, entry, fd))
            yield
        finally:
            for key, entry, fd in reversed(held):
                try:
                    self._release_file(key, fd)
                finally:
                    self._release_thread(key, entry)
