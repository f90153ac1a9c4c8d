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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from look.config import ConfigError, load_config
from look.engine.stop_signals import (
    EXIT_STOPPED,
    STOPPABLE_SIGNALS,
    StopSignals,
    TrainingStopped,
    signal_numbers,
)
from look.engine.trainer import Trainer, pretrain
from tests.ddp import free_port
from tests.jobs import terminate_job_when

from .test_trainer import TINY, tiny_config, train_losses


@pytest.fixture
def restore_sigterm() -> Iterator[None]:
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def signal_before_step(
    monkeypatch: pytest.MonkeyPatch,
    step: int,
    number: int,
    *,
    times: int = 1,
    first: Callable[[], object] | None = None,
) -> None:
    """Make the trainer receive signal ``number`` ``times`` times as it starts step ``step``
    (after calling ``first``)."""
    original = Trainer._step

    def step_then_signal(self: Trainer, epoch: int, batch: Any) -> Any:
        if self.global_step + 1 == step:
            if first is not None:
                first()
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


# One thread per process: the job's processes share the machine's cores.
_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _pretrain_command(program: list[str], run: Path, *extra: str) -> list[str]:
    """``program pretrain`` of the tiny run into ``run`` with two loader workers and ``extra``."""
    overrides = [o for o in TINY if not o.startswith(("data.num_workers", "optim.epochs"))]
    overrides += ["data.num_workers=2", *extra]
    command = [*program, "pretrain", "--output", str(run)]
    return command + [argument for override in overrides for argument in ("--set", override)]


def test_the_command_stops_with_status_75_when_the_whole_job_is_signalled(
    tmp_path: Path,
) -> None:
    """As a scheduler does it: SIGTERM to every process of the job, DataLoader workers too."""
    run = tmp_path / "run"
    command = _pretrain_command(
        [sys.executable, "-m", "look"], run, "optim.epochs=200", "train.checkpoint_every_steps=1000"
    )
    status, output = terminate_job_when(command, _ENV, lambda: len(train_losses_or_none(run)) >= 3)
    assert status == EXIT_STOPPED, output
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


_SIGNAL_FROM_THE_MONITOR = """
import os, signal, sys
import torch
import look.engine.monitor as monitor
from look.cli import main

original = monitor.extract_features
calls = []


class SignalsTheJob(torch.utils.data.Dataset):
    # Its first item, loaded by a monitor worker, signals the whole job as a scheduler would.
    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        if index == 0:
            os.killpg(0, signal.SIGTERM)
        return self.inner[index]


def extract(model, dataset, **options):
    calls.append(1)
    # Calls 1 and 2 measure before the first step; 3 is the end of epoch 1 (step 6).
    return original(model, SignalsTheJob(dataset) if len(calls) == 3 else dataset, **options)


monitor.extract_features = extract
sys.exit(main(sys.argv[1:]))
"""


def test_a_signal_while_the_knn_monitor_loads_images_stops_after_its_checkpoint(
    tmp_path: Path,
) -> None:
    # The monitor's loader workers ignore the signal too; a worker killed by it used to fail
    # the measurement (exit status 2) and lose the epoch's checkpoint.
    run = tmp_path / "run"
    command = _pretrain_command(
        [sys.executable, "-c", _SIGNAL_FROM_THE_MONITOR],
        run,
        "optim.epochs=4",
        "train.knn_monitor=synthetic:samples=64,classes=4",
        "train.knn_monitor_images=40",
    )
    job = subprocess.run(
        command, env=_ENV, capture_output=True, text=True, timeout=300, start_new_session=True
    )
    assert job.returncode == EXIT_STOPPED, job.stdout + job.stderr
    # The signal came after step 6's verdict: the epoch's checkpoint, then one more step.
    assert "stopped on SIGTERM at step 7 of 24" in job.stderr
    saved = sorted(path.name for path in (run / "checkpoints").glob("ckpt-*.pt"))
    assert saved[-2:] == ["ckpt-000000006.pt", "ckpt-000000007.pt"]


@pytest.mark.slow  # 10 s: the loader waits 5 s for its workers first (hangs without the fix)
@pytest.mark.usefixtures("restore_sigterm")
def test_a_loader_worker_stuck_in_a_read_is_ended_when_the_run_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Workers ignore SIGTERM, so the loader's own fallback cannot end one stuck in a read; the
    # process would then wait for it at exit, past the scheduler's grace period.
    import multiprocessing

    # 60 steps an epoch: the worker is still loading batches ahead when the run stops.
    trainer = Trainer(
        tiny_config("data.num_workers=1", "data.synthetic_num_samples=960"), tmp_path / "run"
    )
    stuck = tmp_path / "reads_hang_from_now_on"
    dataset_type = type(trainer.dataset)
    read = dataset_type.__getitem__

    def hanging_read(self: Any, index: int) -> Any:
        if stuck.exists():
            time.sleep(120)
        return read(self, index)

    monkeypatch.setattr(dataset_type, "__getitem__", hanging_read)
    signal_before_step(monkeypatch, 3, signal.SIGTERM, first=stuck.touch)
    started = time.time()
    with pytest.raises(TrainingStopped):
        trainer.fit()
    assert time.time() - started < 60
    assert multiprocessing.active_children() == []


@pytest.mark.usefixtures("restore_sigterm")
def test_a_stopped_fresh_start_keeps_no_finished_marks_of_an_older_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    pretrain(tiny_config("train.max_steps=2"), run)  # finished: summary.json and a backbone
    signal_before_step(monkeypatch, 2, signal.SIGTERM)
    with pytest.raises(TrainingStopped):
        pretrain(tiny_config(), run, resume=False)
    # The demo takes a run with a summary for finished: an old one must not pass for this one's.
    assert not (run / "summary.json").exists() and not (run / "backbone.safetensors").exists()


@pytest.mark.parametrize("debug", [[], ["--debug"]])
def test_the_command_reports_a_stop_in_one_line_with_status_75(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    debug: list[str],
) -> None:
    import look.engine.trainer as trainer_module
    from look.cli import main

    def stopped(*args: Any, **kwargs: Any) -> Any:
        raise TrainingStopped("SIGUSR1", 7, 12, "RUN/checkpoints")

    monkeypatch.setattr(trainer_module, "pretrain", stopped)
    overrides = [argument for o in TINY for argument in ("--set", o)]
    handlers = {number: signal.getsignal(number) for number in signal_numbers(STOPPABLE_SIGNALS)}
    try:
        assert main([*debug, "pretrain", "--output", str(tmp_path), *overrides]) == EXIT_STOPPED
        # Until the process exits, a stop signal (torchrun's SIGTERM once another rank has
        # left) no longer kills it: its status stays 75.
        assert {signal.getsignal(number) for number in handlers} == {signal.SIG_IGN}
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert capsys.readouterr().err == (
        "look: stopped on SIGUSR1 at step 7 of 12; the checkpoint of step 7 is in "
        "RUN/checkpoints; run the same command to resume\n"
    )


_SIGNAL_WHILE_WORKERS_START = """
import os, signal, sys
import torch
from torch.utils.data import DataLoader, Dataset
from look.engine.stop_signals import StopSignals, start_workers


class SignalsTheJob(Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, index):
        if index == 0:  # the first worker up signals the job while the second may be starting
            os.killpg(0, signal.SIGTERM)
        return torch.zeros(2)


numbers = (int(signal.SIGTERM),)
with StopSignals(["SIGTERM"]) as stop:
    for _ in range(20):
        loader = DataLoader(SignalsTheJob(), batch_size=4, num_workers=2)
        for _ in start_workers(loader, numbers):
            pass
print(stop.received)
"""


def test_a_signal_while_loader_workers_start_kills_none_of_them() -> None:
    # torch's worker installs its own SIGTERM handler (death, unless the parent sent it) before
    # the worker_init_fn runs: without the signals blocked across the start, a worker died in
    # that gap (on the first of these 20 loaders, typically).
    job = subprocess.run(
        [sys.executable, "-c", _SIGNAL_WHILE_WORKERS_START],
        env=_ENV,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert job.returncode == 0 and job.stdout == "SIGTERM\n", job.stderr[-2000:]


@pytest.mark.usefixtures("restore_sigterm")
def test_a_signal_at_an_epochs_end_saves_before_the_knn_monitor_and_the_resumed_run_measures_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grace period before SIGKILL is for saving; a monitor over a large test set could
    outlast it. The epoch's measurement then comes first in the resumed run, with the same value."""
    from .test_monitor import MONITOR, _monitor_rows

    pretrain(tiny_config(*MONITOR), tmp_path / "full")
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        signal_before_step(patch, 6, signal.SIGTERM)  # the last step of epoch 1 (of 2)
        with pytest.raises(TrainingStopped, match="at step 6 of 12"):
            pretrain(tiny_config(*MONITOR), run)
    assert [row["step"] for row in _monitor_rows(run)] == [0], "measured before the save"
    pretrain(tiny_config(*MONITOR), run)
    assert _monitor_rows(run) == _monitor_rows(tmp_path / "full")
    assert train_losses(run) == train_losses(tmp_path / "full")


def test_a_run_failing_on_an_error_in_a_loader_worker_exits_at_once(tmp_path: Path) -> None:
    """The workers ignore SIGTERM, the signal multiprocessing ends a process's workers with at
    exit before waiting for them: a run failing on an undecodable image with two workers (the
    defaults) waited forever for its workers, a cluster job holding its GPUs to its time limit."""
    from tests.data.conftest import write_png

    root = tmp_path / "images"
    for name, colour in {"cat": (200, 30, 30), "dog": (30, 30, 200)}.items():
        for i in range(8):
            write_png(root / "train" / name / f"{i}.png", colour)
    (root / "train" / "cat" / "3.png").write_bytes(b"not a png")
    command = [
        sys.executable, "-m", "look", "pretrain", "--output", str(tmp_path / "run"),
        "--set", "data.dataset=imagefolder", "--set", f"data.root={root}",
        "--set", "data.num_workers=2", "--set", "data.image_size=16",
        "--set", "model.backbone=look_resnet_tiny", "--set", "method.k=4",
        "--set", "optim.batch_size=8", "--set", "optim.epochs=1", "--set", "train.device=cpu",
        "--set", "train.progress=false", "--set", "train.tensorboard=false",
    ]  # fmt: skip
    finished = subprocess.run(command, env=_ENV, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2, finished.stdout + finished.stderr
    assert "cannot decode image file" in finished.stderr and "3.png" in finished.stderr


def test_a_worker_ignores_a_schedulers_sigterm_but_ends_on_its_parents() -> None:
    """The loader's last resort for a worker that does not leave (after a worker's error, say)
    is SIGTERM from this process, and so is multiprocessing's at exit, before it waits for its
    children: workers that ignored every SIGTERM kept such a process from ever exiting. A
    scheduler's SIGTERM (from another process) must still leave them running."""
    from look.engine.stop_signals import start_workers

    loader = torch.utils.data.DataLoader(torch.zeros(64, 2), batch_size=4, num_workers=2)
    batches = start_workers(loader, (signal.SIGTERM, signal.SIGUSR1))
    next(batches)
    workers = list(batches._workers)  # type: ignore[attr-defined]
    for worker in workers:  # from another process, as a scheduler sends it
        subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)
    time.sleep(1.0)
    assert all(worker.is_alive() for worker in workers)
    for worker in workers:
        worker.terminate()  # from the parent
    deadline = time.time() + 10
    while any(worker.is_alive() for worker in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(worker.is_alive() for worker in workers)
    from look.engine.stop_signals import end_workers

    end_workers(batches)


def test_a_signal_during_the_memory_warm_up_stops_after_its_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_sigterm: None
) -> None:
    # The warm-up is a pass over the whole data (ImageNet: 1.28M forwards): waiting for its end
    # outlasts a scheduler's grace period, and the job is killed instead of stopped.
    from look.methods.look import LOOK

    warmed: list[int] = []
    original = LOOK.warmup_step

    def warm_then_signal(self: LOOK, batch: Any) -> None:
        warmed.append(len(batch.labels))
        original(self, batch)
        if len(warmed) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(LOOK, "warmup_step", warm_then_signal)
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped, match="stopped on SIGTERM at step 0 of 12"):
        pretrain(tiny_config("method.memory_init=warmup"), run)
    assert len(warmed) == 1  # of the pass's 6 batches
    assert not (run / "summary.json").exists()
    monkeypatch.setattr(LOOK, "warmup_step", original)
    assert pretrain(tiny_config("method.memory_init=warmup"), run).global_step == 12
