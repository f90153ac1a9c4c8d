"""One training job per run directory: an exclusive lock that a second job finds taken.

Two jobs started on the same ``--output`` (a job resubmitted while the first still runs, or
torchrun workers that outlived a killed launcher) would both resume from the same checkpoint and
then write the same checkpoints and logs. Rank 0 holds an ``flock`` on ``OUTPUT/.look.lock`` for
the whole run; the kernel drops it when the process dies, however it dies, so a crashed job never
leaves a stale lock behind. ``flock`` covers the processes of one machine, and of several where
the shared file system supports it (most NFS v4 and Lustre set-ups do).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # (Windows: no lock, as before)
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".look.lock"


class RunDirectoryBusyError(OSError):
    """Another live process holds the run directory's lock (an OSError, as EBUSY is)."""


class RunDirectoryLock:
    """An exclusive, non-blocking lock on ``directory`` (created if needed), released by
    :meth:`release`, at exit of a ``with`` block, or by the process's death."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self._file: int | None = None

    def acquire(self) -> None:
        if fcntl is None or self._file is not None:
            return
        for _ in range(3):  # (a lock file removed between our open and our flock: open anew)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(handle, 200, 0).decode("utf-8", errors="replace").strip()
                os.close(handle)
                raise RunDirectoryBusyError(
                    f"{self.path.parent} is in use by another training job "
                    f"({holder or 'unknown'}); wait for it to end or stop it, or use another "
                    "--output"
                ) from None
            if _same_file(handle, self.path):
                break
            os.close(handle)
        else:
            raise RunDirectoryBusyError(f"{self.path} keeps being replaced while it is locked")
        # Who holds it, for the message a second job prints (the lock itself is the flock).
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._file = handle

    def held(self) -> bool:
        """Whether the lock file at :attr:`path` is still the one this lock holds: a run folder
        removed (or replaced) while its job trains lets another job lock a new file there, and
        both would then write one run. Always true where there is no lock (no ``fcntl``)."""
        if fcntl is None:
            return True
        return self._file is not None and _same_file(self._file, self.path)

    def release(self) -> None:
        if self._file is not None:
            os.close(self._file)  # closing drops the flock
            self._file = None

    def __enter__(self) -> RunDirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _same_file(handle: int, path: Path) -> bool:
    """Whether open file ``handle`` is the file at ``path`` (same device and inode)."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(handle)
    return (held.st_dev, held.st_ino) == (found.st_dev, found.st_ino)
