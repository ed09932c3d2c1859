"""One process per piece of state: an flock on a lock file, taken before anything else is touched."""

from __future__ import annotations

import fcntl
import os

from virtbroker.common.errors import ConfigError


class StateLock:
    """An exclusive, non-blocking flock on PATH, held for the life of the process.

    The lock file holds the holder's pid, so a second process can name it in its error.
    The kernel drops the lock when the holder exits, kill -9 included, so a stale file
    never blocks a restart.
    """

    def __init__(self, path: str, what: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise ConfigError(f"{what} is already running on {os.path.dirname(path)} ({who} holds {path})") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1


def _read_pid(fd: int) -> int | None:
    # The holder writes its pid just after locking; an empty file means it is at that instant.
    try:
        return int(os.pread(fd, 32, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None
