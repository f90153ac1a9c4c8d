"""Atomic file writes: a reader (or a resumed run) never sees a half-written file."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

# Serialises our own umask set-and-restore (the fallback of :func:`current_umask`), so two of our
# threads never read each other's temporary umask.
_UMASK_LOCK = threading.Lock()
# Linux's per-process status file, whose "Umask:" line (kernel >= 4.7) gives the umask.
_PROC_STATUS = "/proc/self/status"


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows.

    Linux reports it in ``/proc/self/status``; reading it there is race-free and sees a umask set
    after import. Elsewhere the only way is ``os.umask`` set-and-restore, done under a lock and
    with the strict 0o077 as the temporary value: a file another thread creates in that instant
    is at worst owner-only, never world-writable.
    """
    # Bytes: the status file's Name line may be in any encoding.
    with contextlib.suppress(OSError, ValueError), open(_PROC_STATUS, "rb") as status:
        for line in status:
            if line.startswith(b"Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        umask = os.umask(0o077)
        os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_write_path(
    path: str | Path,
    *,
    prefix: str | None = None,
    suffix: str = ".tmp",
    durable: bool = False,
    file_mode: int | None = None,
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, rename it over ``path``.

    The temporary file lives in the same folder (``prefix`` defaults to ``.NAME.``), so the rename
    is atomic. ``durable`` also fsyncs the file before and the folder after the rename, so the
    write survives a power loss (checkpoints). ``file_mode`` sets permissions; by default the file
    gets what a plain ``open()`` would give it, ``0o666 & ~umask`` (``mkstemp`` makes files
    owner-only, which would hide weights and metrics from colleagues on a shared cluster). On any
    error the temporary file is removed and the target is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(
        dir=path.parent, prefix=prefix if prefix is not None else f".{path.name}.", suffix=suffix
    )
    os.close(fd)
    temp = Path(temp_name)
    try:
        yield temp
        if durable:
            with open(temp, "rb+") as file:
                os.fsync(file.fileno())
        os.chmod(temp, file_mode if file_mode is not None else 0o666 & ~current_umask())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    if durable:
        fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename durable; directories cannot be opened for fsync on Windows."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str, *, durable: bool = False) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    with atomic_write_path(path, durable=durable) as temp:
        temp.write_text(text, encoding="utf-8", newline="")
