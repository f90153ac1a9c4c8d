"""A run stopped by a signal (a cluster's preemption or time limit) saves the step it was in and
resumes from it exactly, on one process, on several ranks and from the command line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from look.config import ConfigError, load_config
from look.engine.stop_signals import EXIT_STOPPED, StopSignals, TrainingStopped
from look.engine.trainer import Trainer, pretrain
from tests.ddp import free_port

from .test_trainer import TINY, tiny_config, train_losses


@pytest.fixture
def restore_sigterm() -> Iterator[None]:
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def signal_before_step(
    monkeypatch: pytest.MonkeyPatch, step: int, number: int, *, times: int = 1
) -> None:
    """Make the trainer receive signal ``number`` ``times`` times as it starts step ``step``."""
    original = Trainer._step

    def step_then_signal(self: Trainer, epoch: int, batch: Any) -> Any:
        if self.global_step + 1 == step:
            for _ in range(times):
                os.kill(os.getpid(), number)
        return original(self, epoch, batch)

    monkeypatch.setattr(Trainer, "_step", step_then_signal)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[SIGKILL]", "'SIGKILL' is not a signal a run can stop on"),
        ("[SIGTERN]", "'SIGTERN' is not a signal"),
        ("SIGTERM", "train.stop_signals must be a list"),
        ("[15]", "train.stop_signals must be a string"),
    ],
)
def test_signals_that_cannot_stop_a_run_are_refused(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"train.stop_signals={value}"])


def test_an_empty_list_catches_nothing_and_the_default_is_sigterm_and_sigusr1() -> None:
    assert load_config(None, []).train.stop_signals == ["SIGTERM", "SIGUSR1"]
    with StopSignals([]) as stop:
        assert stop.received is None and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_the_first_signal_is_recorded_later_ones_change_nothing_and_the_handler_comes_back() -> (
    None
):
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda number, frame: calls.append(number))
    try:
        with StopSignals(["SIGUSR1", "SIGTERM"]) as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            # SLURM and torchrun both signal a worker: the second must not kill it.
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.received == "SIGUSR1" and calls == []
        os.kill(os.getpid(), signal.SIGUSR1)  # restored on exit
        assert calls == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.usefixtures("restore_sigterm")
def test_sigterm_saves_the_step_in_progress_and_the_resumed_run_is_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pretrain(tiny_config(), tmp_path / "full")
    run = tmp_path / "run"
    handler_before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        # Twice, as a worker under torchrun in a SLURM job gets it; checkpoints fall every 4 steps.
        signal_before_step(patch, 3, signal.SIGTERM, times=2)
        with pytest.raises(TrainingStopped, match="stopped on SIGTERM at step 3 of 12") as stop:
            pretrain(tiny_config(), run)
    assert stop.value.global_step == 3
    assert signal.getsignal(signal.SIGTERM) == handler_before
    assert (run / "checkpoints" / "ckpt-000000003.pt").is_file()
    # Neither of the files that say a run is finished (the demo skips a run with a summary).
    assert not (run / "summary.json").exists() and not (run / "backbone.safetensors").exists()
    pretrain(tiny_config(), run)
    assert train_losses(run) == train_losses(tmp_path / "full")
    assert json.loads((run / "summary.json").read_text())["global_step"] == 12


@pytest.mark.usefixtures("restore_sigterm")
def test_handlers_are_restored_after_a_run(tmp_path: Path) -> None:
    def mine(number: int, frame: object) -> None:
        del number, frame

    signal.signal(signal.SIGTERM, mine)
    pretrain(tiny_config("train.max_steps=1"), tmp_path / "run")
    assert signal.getsignal(signal.SIGTERM) is mine


@pytest.mark.usefixtures("restore_sigterm")
def test_a_signal_during_the_last_step_lets_the_run_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    signal_before_step(monkeypatch, 12, signal.SIGTERM)
    result = pretrain(tiny_config(), tmp_path / "run")
    assert result.global_step == 12 and result.backbone_path is not None


def _stop_on_rank(rank: int, port: int, out_dir: str, signalled_rank: int, queue: Any) -> None:
    """One of two gloo ranks; only ``signalled_rank`` receives SIGTERM, at its step 3."""
    from tests.ddp import set_torchrun_environment

    set_torchrun_environment(rank, 2, port)
    torch.set_num_threads(1)
    patch = pytest.MonkeyPatch()
    if rank == signalled_rank:
        signal_before_step(patch, 3, signal.SIGTERM)
    try:
        pretrain(tiny_config("train.ddp_timeout_s=60"), Path(out_dir))
        queue.put((rank, "finished", None))
    except TrainingStopped as stopped:
        queue.put((rank, stopped.signal_name, stopped.global_step))
    finally:
        patch.undo()
        torch.distributed.destroy_process_group()


def _pretrain_on_two_ranks(rank: int, port: int, out_dir: str) -> None:
    from .test_trainer import pretrain_on_rank

    pretrain_on_rank(rank, port, out_dir, ())


@pytest.mark.ddp
@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path: Path) -> None:
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.spawn(_pretrain_on_two_ranks, args=(free_port(), str(tmp_path / "full")), nprocs=2)
    run = tmp_path / "run"
    mp.spawn(_stop_on_rank, args=(free_port(), str(run), 1, queue), nprocs=2)
    outcomes = sorted(queue.get() for _ in range(2))
    assert outcomes == [(0, "a signal another rank received", 3), (1, "SIGTERM", 3)]
    saved = torch.load(run / "checkpoints" / "ckpt-000000003.pt", weights_only=True)
    assert len(saved["rng_per_rank"]) == 2  # every rank resumes its own random generators
    mp.spawn(_pretrain_on_two_ranks, args=(free_port(), str(run)), nprocs=2)
    assert train_losses(run) == train_losses(tmp_path / "full")


def test_the_command_stops_with_status_75_when_the_whole_job_is_signalled(
    tmp_path: Path,
) -> None:
    """As a scheduler does it: SIGTERM to every process of the job, DataLoader workers too."""
    run = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith(("data.num_workers", "optim.epochs"))]
    overrides += ["data.num_workers=2", "optim.epochs=200", "train.checkpoint_every_steps=1000"]
    command = [sys.executable, "-m", "look", "pretrain", "--output", str(run)]
    for override in overrides:
        command += ["--set", override]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and job.poll() is None and len(train_losses_or_none(run)) < 3:
        time.sleep(0.05)
    assert job.poll() is None, job.communicate()[0].decode()
    os.killpg(job.pid, signal.SIGTERM)
    output = job.communicate(timeout=120)[0].decode()
    assert job.returncode == EXIT_STOPPED, output
    assert "stopped on SIGTERM at step" in output and "run the same command to resume" in output
    assert "DataLoader worker" not in output
    step = int(re.search(r"stopped on SIGTERM at step (\d+) of 1200", output)[1])  # type: ignore[index]
    newest = max((run / "checkpoints").glob("ckpt-*.pt"))
    assert newest.name == f"ckpt-{step:09d}.pt" and max(train_losses(run)) == step


def train_losses_or_none(run: Path) -> dict[int, float]:
    """:func:`train_losses` of a run that may not have logged yet (empty)."""
    try:
        return train_losses(run)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_a_signal_this_platform_lacks_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    from look.engine.stop_signals import signal_numbers

    monkeypatch.delattr(signal, "SIGUSR1")  # as on Windows: the default config must still load
    assert signal_numbers(["SIGTERM", "SIGUSR1"]) == (int(signal.SIGTERM),)
