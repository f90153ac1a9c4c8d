"""Fine-tuning stops on a signal the way pre-training does: every rank finishes the step in
progress, the state is saved there (mid-epoch too) and ``TrainingStopped`` is raised; a re-run
ends exactly where an uninterrupted fine-tuning does. A non-finite loss on one rank stops every
rank (none waits in DDP's all-reduce for the timeout)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from look.engine.checkpoint import load_latest_checkpoint
from look.engine.stop_signals import TrainingStopped
from look.evaluation import finetune, state_fingerprint
from look.models import create_backbone
from tests.ddp import free_port, init_gloo
from tests.evaluation.test_finetune_resume_ddp import OPTIONS, SPEC  # 4 steps per epoch
from tests.jobs import terminate_job_when

WORLD_SIZE = 2


class _Probe(nn.Module):
    """Dropout after the backbone; in training, the ``signal_at``-th forward pass (counted from
    1) sends SIGTERM to this process and the ``nan_at``-th returns NaN. Every training forward
    records one draw of the global generator (what dropout draws from)."""

    def __init__(self, backbone: nn.Module, *, signal_at: int = 0, nan_at: int = 0) -> None:
        super().__init__()
        self.backbone, self.dropout = backbone, nn.Dropout(0.5)
        self.signal_at, self.nan_at, self.calls = signal_at, nan_at, 0
        self.draws: list[float] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.dropout(self.backbone(images))
        if self.training:
            self.calls += 1
            self.draws.append(float(torch.rand(())))
            if self.calls == self.signal_at:
                os.kill(os.getpid(), signal.SIGTERM)
            if self.calls == self.nan_at:
                features = features * float("nan")
        return features


def _backbone() -> tuple[nn.Module, int]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_backbone("look_cnn_small")


def _probed_finetune(
    checkpoint_dir: Path | None, **probe: int
) -> tuple[dict[str, Any], list[float]]:
    """The fine-tuning's result, with ``tested_sha256`` the fingerprint of the model that made
    the test predictions, and its draws (the probe is deep-copied into the classifier: its draws
    are read through the trained copy's extract_features call)."""
    import importlib

    module = importlib.import_module("look.evaluation.finetune")
    backbone, dim = _backbone()
    seen: list[list[float]] = []
    tested: list[str] = []
    original = module.extract_features

    def extract(model: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(list(model.backbone.draws))
        tested.append(state_fingerprint(model))
        return original(model, *args, **kwargs)

    module.extract_features = extract
    try:
        result = finetune(
            _Probe(backbone, **probe),
            dim,
            SPEC,
            options=OPTIONS,
            progress=False,
            checkpoint_dir=checkpoint_dir,
            stop_signals=("SIGTERM",),
        )
    finally:
        module.extract_features = original
    return {**result, "tested_sha256": tested[0]}, seen[0]


def test_a_signal_saves_the_step_in_progress_and_the_rerun_ends_as_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    whole, whole_draws = _probed_finetune(None)
    checkpoints = tmp_path / "checkpoints"
    before = torch.random.get_rng_state()
    with pytest.raises(TrainingStopped, match="SIGTERM at step 3 of 8") as stopped:
        _probed_finetune(checkpoints, signal_at=3)
    assert torch.equal(torch.random.get_rng_state(), before), "the caller's generator moved"
    assert stopped.value.checkpoint_dir == str(checkpoints)
    found = load_latest_checkpoint(checkpoints)
    assert found is not None
    state, path = found
    assert path.name == "ckpt-000000003.pt" and state["step"] == 3 and state["epoch"] == 0
    assert state["epoch_images"] == 24, "the epoch's three batches so far"

    resumed, resumed_draws = _probed_finetune(checkpoints)
    assert resumed["final_epoch_train_loss"] == whole["final_epoch_train_loss"]
    assert (resumed["top1"], resumed["mean_per_class_accuracy"]) == (
        whole["top1"],
        whole["mean_per_class_accuracy"],
    )
    assert resumed_draws == whole_draws[3:], "the random stream went on from step 3"
    assert not checkpoints.exists()


def test_without_a_checkpoint_folder_no_signal_is_caught() -> None:
    # Stopping is saving: with nowhere to save, SIGTERM keeps its usual effect (here: the
    # handler pytest's process has, which this test replaces by one that records it).
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: received.append(number))
    try:
        result, _ = _probed_finetune(None, signal_at=2)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == [signal.SIGTERM] and result["steps"] == 8


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_gloo(rank, WORLD_SIZE, port, timeout_s=60)
    outcome: dict[str, Any] = {}
    try:
        checkpoints = Path(out_dir) / "checkpoints"
        whole, outcome["whole_draws"] = _probed_finetune(None)
        outcome["whole"] = whole["final_epoch_train_loss"]
        outcome["whole_tested"] = whole["tested_sha256"]
        try:  # only rank 1 is signalled, at its 6th step
            _probed_finetune(checkpoints, signal_at=6 if rank == 1 else 0)
        except TrainingStopped as stopped:
            outcome["stopped"] = [stopped.signal_name, stopped.global_step]
        resumed, _ = _probed_finetune(checkpoints)
        outcome["resumed"] = resumed["final_epoch_train_loss"]
        outcome["resumed_tested"] = resumed["tested_sha256"]
        try:  # a NaN on rank 0 only, at its 2nd step: rank 1 must raise too, not hang
            _probed_finetune(None, nan_at=2 if rank == 0 else 0)
        except ValueError as error:
            outcome["diverged"] = str(error)
    finally:
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(outcome))
        dist.destroy_process_group()


@pytest.mark.ddp
def test_under_ddp_one_signalled_rank_stops_every_rank_and_one_nan_fails_every_rank(
    tmp_path: Path,
) -> None:
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["stopped"] == ["a signal another rank received", 6]
    assert ranks[1]["stopped"] == ["SIGTERM", 6]
    for outcome in ranks:
        assert outcome["resumed"] == outcome["whole"]
        # Every rank predicts its test shard with one model, rank 0's (whose checkpoints resume).
        assert outcome["whole_tested"] == ranks[0]["whole_tested"]
        assert outcome["resumed_tested"] == outcome["whole_tested"]
        assert "non-finite loss at epoch 1" in outcome["diverged"]
    assert ranks[0]["whole_draws"] != ranks[1]["whole_draws"], "ranks drew the same dropout"


# 15-20 s on a 2-core machine (two starts of the command, kNN, fine-tuning); the in-process and
# DDP tests above cover the stop itself.
@pytest.mark.slow
def test_look_evaluate_stops_with_status_75_and_the_same_command_finishes(tmp_path: Path) -> None:
    """As a scheduler does it: SIGTERM to every process of the job, DataLoader workers too, while
    fine-tuning runs; results.json keeps the finished kNN and marks fine-tuning pending."""
    import subprocess
    import sys

    from look.engine.stop_signals import EXIT_STOPPED

    output = tmp_path / "eval"
    command = [
        sys.executable, "-m", "look", "evaluate", "--timm", "look_cnn_small",
        "--dataset", "synthetic:samples=256,classes=4,size=12", "--protocol", "knn,finetune",
        "--knn-k", "3", "--finetune-epochs", "8", "--finetune-batch-size", "32",
        "--num-workers", "2", "--device", "cpu", "--no-cache", "--no-progress",
        "--output", str(output),
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    checkpoints = output / "finetune_checkpoints"
    status, printed = terminate_job_when(
        command, environment, lambda: any(checkpoints.glob("*.pt"))
    )
    assert status == EXIT_STOPPED, printed
    assert "stopped on SIGTERM at step" in printed and "run the same command" in printed
    assert "DataLoader worker" not in printed and "Traceback" not in printed
    report = json.loads((output / "results.json").read_text())
    assert report["complete"] is False and report["pending_protocols"] == ["finetune"]
    assert "failed_protocol" not in report and "knn" in report["protocols"]

    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    report = json.loads((output / "results.json").read_text())
    assert report["complete"] is True and report["protocols"]["finetune"]["steps"] == 64
    assert not checkpoints.exists()
