"""Two gloo ranks on CPU: fine-tuning under DDP runs without CUDA and writes its results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from look.evaluation import FinetuneOptions, KnnOptions, ModelSource, evaluate
from tests.ddp import free_port, init_gloo

pytestmark = pytest.mark.ddp

WORLD_SIZE = 2


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_gloo(rank, WORLD_SIZE, port, timeout_s=120)
    try:
        evaluate(
            ModelSource(timm="look_cnn_small"),
            "synthetic:samples=32,classes=2,size=12",
            ["knn", "finetune"],
            output_dir=Path(out_dir) / "eval",
            device="cpu",
            cache_dir=None,
            progress=False,
            knn_options=KnnOptions(ks=(3,)),
            finetune_options=FinetuneOptions(epochs=1, batch_size=8),
        )
    finally:
        dist.destroy_process_group()


def test_finetune_under_gloo_on_cpu(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    written = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert written["distributed"] and written["world_size"] == WORLD_SIZE
    finetune = written["protocols"]["finetune"]
    assert finetune["batch_size"] == 8 and finetune["steps"] == 4
    assert 0.0 <= finetune["top1"] <= 100.0 and "knn" in written["protocols"]
