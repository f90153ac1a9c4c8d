"""Shared fixtures for the evaluation tests: a tiny pre-trained run and a tiny synthetic spec."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from look.config import load_config
from look.engine.trainer import pretrain

# Synthetic data small enough that every protocol runs in about a second on two CPU cores.
SYNTHETIC_SPEC = "synthetic:samples=64,classes=4,size=16"

# A LOOK run pre-trained with *coarse* labels (2 groups of the 4 synthetic classes), so the
# coarse-to-fine bookkeeping can be checked; small enough to train in a few seconds.
TINY_PRETRAIN = [
    "data.dataset=synthetic",
    "data.labels=coarse",
    "data.synthetic_num_samples=64",
    "data.synthetic_num_classes=4",
    "data.synthetic_image_size=16",
    "data.num_workers=0",
    "model.backbone=look_resnet_tiny",
    "method.name=look",
    "method.k=5",
    "method.head_hidden_dim=32",
    "method.head_out_dim=16",
    "optim.batch_size=16",
    "optim.epochs=1",
    "optim.warmup_epochs=0.5",
    "train.checkpoint_every_steps=4",
    "train.tensorboard=false",
    "train.progress=false",
    "train.device=cpu",
]


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run directory of a finished `look pretrain` (checkpoints, config.yaml, backbone.safetensors)."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # see single_cpu_thread
    try:
        pretrain(load_config(None, TINY_PRETRAIN), run_dir)
    finally:
        torch.set_num_threads(previous)
    return run_dir


@pytest.fixture(autouse=True)
def single_cpu_thread() -> object:
    """One intra-op thread: these tensors are tiny, and on a shared 2-core machine extra threads
    only add contention (the L-BFGS fits run 20× slower with 2 threads under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
