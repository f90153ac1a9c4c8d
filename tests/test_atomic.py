from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from look import atomic
from look.atomic import atomic_write_path, atomic_write_text, current_umask


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test under the umask it is parametrised with, then restore the previous one."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077], indirect=True, ids=oct)
def test_written_files_get_the_mode_a_plain_open_gives(tmp_path: Path, umask: int) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert _mode(plain) == 0o666 & ~umask
    atomic_write_text(tmp_path / "summary.json", "{}")
    # As torch.save and safetensors write: into the temporary file the writer yields.
    with atomic_write_path(tmp_path / "ckpt.pt", durable=True) as temp, open(temp, "wb") as file:
        file.write(b"weights")
    for written in ("summary.json", "ckpt.pt"):
        assert _mode(tmp_path / written) == _mode(plain), written
    # An explicit mode still wins.
    with atomic_write_path(tmp_path / "features.pt", file_mode=0o600) as temp:
        temp.write_bytes(b"")
    assert _mode(tmp_path / "features.pt") == 0o600


@pytest.mark.skipif(os.name != "posix", reason="POSIX umask")
@pytest.mark.parametrize("umask", [0o022, 0o027], indirect=True, ids=oct)
def test_current_umask_reads_without_changing_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, umask: int
) -> None:
    assert current_umask() == umask
    # Where /proc is missing, the set-and-restore fallback gives the same and restores it.
    monkeypatch.setattr(atomic, "_PROC_STATUS", str(tmp_path / "no_proc"))
    assert current_umask() == umask
    assert os.umask(umask) == umask
