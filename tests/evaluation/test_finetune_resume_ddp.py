"""Two gloo ranks on CPU: a DDP fine-tuning killed after its first epoch and resumed ends with
exactly the weights of an uninterrupted one, while the ranks draw different random numbers
(dropout from each rank's own seed); its checkpoint resumes in one process with a warning."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from look.data import DataSpec
from look.evaluation import FinetuneOptions, finetune, state_fingerprint
from look.models import create_backbone
from tests.ddp import free_port, init_gloo

pytestmark = pytest.mark.ddp

WORLD_SIZE = 2
SPEC = DataSpec(
    dataset="synthetic",
    synthetic_num_samples=32,
    synthetic_num_classes=2,
    synthetic_image_size=12,
    image_size=12,
)
OPTIONS = FinetuneOptions(epochs=2, batch_size=8, lr=0.05)
# (look.evaluation.finetune, the attribute, is the function: import the module by name.)
FINETUNE_MODULE = importlib.import_module("look.evaluation.finetune")


class _Killed(Exception):
    """Stands for a kill right after the first epoch's checkpoint, on every rank."""


def _backbone() -> tuple[nn.Module, int]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone, dim = create_backbone("look_cnn_small")
    # Dropout draws from the global generator at every step: each rank from its own stream.
    return nn.Sequential(backbone, nn.Dropout(0.5)), dim


def _finetune(
    backbone: nn.Module, dim: int, checkpoint_dir: Path | None, *, kill_after_first_epoch: bool
) -> dict[str, Any]:
    """``finetune``'s result plus ``weights``, the fingerprint of the model it tested."""
    weights: list[str] = []
    original_extract, original_barrier = FINETUNE_MODULE.extract_features, FINETUNE_MODULE.barrier

    def extract(model: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        weights.append(state_fingerprint(model))
        return original_extract(model, *args, **kwargs)

    def barrier_then_die() -> None:
        original_barrier()  # the barrier right after the epoch's checkpoint: every rank dies
        raise _Killed

    FINETUNE_MODULE.extract_features = extract
    if kill_after_first_epoch:
        FINETUNE_MODULE.barrier = barrier_then_die
    try:
        result = finetune(
            backbone, dim, SPEC, options=OPTIONS, progress=False, checkpoint_dir=checkpoint_dir
        )
    finally:
        FINETUNE_MODULE.extract_features, FINETUNE_MODULE.barrier = (
            original_extract,
            original_barrier,
        )
    return {**result, "weights": weights[0]}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_gloo(rank, WORLD_SIZE, port, timeout_s=120)
    try:
        backbone, dim = _backbone()
        # The caller's generators do not matter: fine-tuning seeds its own, each rank apart.
        torch.manual_seed(1000 + rank)
        whole = _finetune(backbone, dim, None, kill_after_first_epoch=False)

        torch.manual_seed(1000 + rank)  # the same start as the uninterrupted run
        checkpoints = Path(out_dir) / "checkpoints"
        try:
            _finetune(backbone, dim, checkpoints, kill_after_first_epoch=True)
        except _Killed:
            pass
        else:
            raise AssertionError("the fine-tuning was not killed")
        files = sorted(p.name for p in checkpoints.glob("ckpt-*.pt"))
        if rank == 0:  # kept for the single-process resume below (the resume removes its own)
            shutil.copytree(checkpoints, Path(out_dir) / "left_checkpoints")
        # A fresh process: every rank's generator as a new one leaves it, the same on each.
        torch.manual_seed(7)
        resumed = _finetune(backbone, dim, checkpoints, kill_after_first_epoch=False)
        outcomes = {"whole": whole, "files": files, "resumed": resumed}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(outcomes))
    finally:
        dist.destroy_process_group()


# 13-20 s on a busy 2-core machine: spawning and importing dominate.
@pytest.mark.slow
def test_a_killed_ddp_finetuning_resumes_each_ranks_random_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    for rank in range(WORLD_SIZE):
        outcomes = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert outcomes["files"] == ["ckpt-000000004.pt"], "killed after the first epoch (step 4)"
        whole, resumed = outcomes["whole"], outcomes["resumed"]
        assert resumed["weights"] == whole["weights"], f"rank {rank}: other weights after resume"
        assert resumed["final_epoch_train_loss"] == whole["final_epoch_train_loss"]
        assert resumed["top1"] == whole["top1"]
    assert not (tmp_path / "checkpoints").exists(), "a finished fine-tuning removes its folder"

    # The 2-rank checkpoint left behind resumes in a single process: it finishes, with a warning
    # that the random streams cannot continue as they were (one process, two saved streams).
    backbone, dim = _backbone()
    saved: list[int] = []
    original_save = FINETUNE_MODULE.save_checkpoint

    def save(directory: Path, step: int, state: dict[str, Any], **kwargs: Any) -> Path:
        saved.append(step)
        return original_save(directory, step, state, **kwargs)

    monkeypatch.setattr(FINETUNE_MODULE, "save_checkpoint", save)
    with pytest.warns(RuntimeWarning, match="written by 2 processes .* runs in 1"):
        result = finetune(
            backbone,
            dim,
            SPEC,
            options=OPTIONS,
            progress=False,
            checkpoint_dir=tmp_path / "left_checkpoints",
        )
    assert saved == [8], "the single process went on from the 2-rank checkpoint's epoch"
    assert result["epochs"] == 2 and 0.0 <= result["top1"] <= 100.0
