"""Atomic file writes: a reader (or a resumed run) never sees a half-written file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


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
    write survives a power loss (checkpoints). ``file_mode`` sets permissions (``mkstemp`` makes
    files owner-only). On any error the temporary file is removed and the target is untouched.
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
        if file_mode is not None:
            os.chmod(temp, file_mode)
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
