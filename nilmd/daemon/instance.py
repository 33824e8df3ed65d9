"""One nilmd per building and runtime folder: an flock on `nilmd-{building}.lock`.

The kernel drops an flock with its holder, so a SIGKILLed daemon never leaves a lock that blocks
the next start; the file's content (pid and what the holder serves) is only for the error line a
second daemon prints."""

from __future__ import annotations

import fcntl
import os

from nilmd.errors import NilmdError


class InstanceLock:
    def __init__(self, path: str):
        self.path = path
        self._fd = -1

    def acquire(self, building: str, where: str) -> None:
        """Take the lock or raise NilmdError naming the daemon that has it and how to run both."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, theirs = os.pread(fd, 512, 0).decode(errors="replace").strip().partition(" ")
            os.close(fd)
            raise NilmdError(f"another nilmd (pid {pid or '?'}{', ' + theirs if theirs else ''}) is running for building "
                             f"{building} ({self.path}); to run a second one for this building "
                             "(another Redis), give it its own --runtime-dir and --state-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {where}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.unlink(self.path)  # while still holding it, so nobody races us for it
            os.close(self._fd)
            self._fd = -1
