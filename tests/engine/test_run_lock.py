"""One training job per run directory (``look.engine.run_lock``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from look.engine.run_lock import LOCK_NAME, RunDirectoryBusyError, RunDirectoryLock
from look.engine.trainer import pretrain
from tests.engine.test_trainer import tiny_config, train_losses


def test_a_second_job_on_a_busy_run_directory_is_refused_before_touching_it(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    pretrain(tiny_config("train.max_steps=2"), run)
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    # (flock locks of two open files conflict within one process too: the first job's stand-in)
    busy = pytest.raises(RunDirectoryBusyError, match=rf"in use by another .*pid {os.getpid()}")
    with RunDirectoryLock(run), busy:
        pretrain(tiny_config(), run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints
    assert sorted(train_losses(run)) == [1, 2]
    # Released at the end of the block and of every run: the run goes on.
    assert pretrain(tiny_config("train.max_steps=3"), run).global_step == 3


def test_a_lock_dies_with_its_process(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from look.engine.run_lock import RunDirectoryLock; "
            f"RunDirectoryLock({str(tmp_path)!r}).acquire(); print('held', flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryBusyError, match=f"pid {holder.pid}"):
            RunDirectoryLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunDirectoryLock(tmp_path)
    lock.acquire()  # no stale lock after a kill -9
    assert (tmp_path / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} on ")
    lock.release()


def _pretrain_expecting_busy(rank: int, port: int, out_dir: str) -> None:
    """A rank of a two-rank run into a busy directory: records that it stopped, and how."""
    from tests.engine.test_trainer import pretrain_on_rank

    try:
        pretrain_on_rank(rank, port, out_dir, ())
    except RunDirectoryBusyError as error:
        Path(out_dir, f"rank{rank}.stopped").write_text(str(error))


@pytest.mark.ddp
def test_every_rank_stops_when_rank_0_finds_the_directory_busy(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from tests.ddp import free_port

    run = tmp_path / "run"
    with RunDirectoryLock(run):
        mp.spawn(_pretrain_expecting_busy, args=(free_port(), str(run)), nprocs=2)
    for rank in (0, 1):  # rank 1 did not wait for rank 0 in a collective
        assert "in use by another" in (run / f"rank{rank}.stopped").read_text()


def test_a_run_whose_folder_was_removed_stops_instead_of_sharing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The folder deleted mid-run: a second job locked a new lock file there and both trained
    # into one folder.
    import shutil

    from look.engine.trainer import Trainer, TrainingStepError

    run = tmp_path / "run"
    lock = RunDirectoryLock(run)
    lock.acquire()
    (run / LOCK_NAME).unlink()
    assert not lock.held(), "the file at the path is no longer the locked one"
    second = RunDirectoryLock(run)
    second.acquire()  # (what a second job now could do)
    assert second.held()
    second.release()
    lock.release()

    original = Trainer._finish_step

    def remove_the_folder_at_step_2(self: Trainer, *, skipped: bool) -> None:
        original(self, skipped=skipped)
        if self.global_step == 1:  # (counted after this call: step 2 is in progress next)
            shutil.rmtree(run)

    monkeypatch.setattr(Trainer, "_finish_step", remove_the_folder_at_step_2)
    with pytest.raises(TrainingStepError, match=r"was removed or replaced while this job trained"):
        pretrain(tiny_config(), run)
    assert not (run / "checkpoints").exists(), "nothing saved into the folder another job may use"
