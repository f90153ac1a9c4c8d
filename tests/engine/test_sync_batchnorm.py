"""train.sync_batchnorm: the conversion, and the runs that must refuse it (CPU ranks, MoCo's
shuffled batch norm). The synchronised statistics themselves need CUDA ranks."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.multiprocessing as mp
from timm.layers import BatchNormAct2d, SyncBatchNormAct
from torch import nn

from look.config import ConfigError
from look.engine.distributed import synchronise_batchnorm
from tests.ddp import free_port, set_torchrun_environment
from tests.engine.test_trainer import tiny_config


def test_every_norm_is_synchronised_with_its_own_parameters_and_activation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3),
        BatchNormAct2d(8, act_layer=nn.ReLU),  # timm's norm + activation in one layer
        nn.Flatten(),
        nn.LazyLinear(4),
        nn.BatchNorm1d(4),
    )
    images = torch.randn(6, 3, 9, 9)
    expected = model(images)
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    running_mean = model[1].running_mean

    assert synchronise_batchnorm(model) == 3
    assert isinstance(model[1], nn.SyncBatchNorm) and isinstance(model[6], nn.SyncBatchNorm)
    assert isinstance(model[3], SyncBatchNormAct) and isinstance(model[3].act, nn.ReLU)
    # The optimizer built before the conversion still updates the model's parameters.
    assert all(a is b for a, b in zip(model.parameters(), parameters, strict=True))
    assert model[1].running_mean is running_mean
    # Outside a process group the synchronised layers compute what the plain ones did.
    torch.testing.assert_close(model(images), expected)
    model(images).sum().backward()
    optimizer.step()
    assert synchronise_batchnorm(model) == 0, "already synchronised layers are not counted"


def test_one_process_keeps_plain_batch_norm(tmp_path: Path) -> None:
    from look.engine.trainer import Trainer

    trainer = Trainer(tiny_config("train.sync_batchnorm=true"), tmp_path / "run")
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in trainer.method.modules())
    assert trainer.plan()["batch_norm"] == "per process"


def _refusals_on_rank(rank: int, port: int, out_dir: str) -> None:
    from look.engine.trainer import Trainer

    set_torchrun_environment(rank, 2, port)
    torch.set_num_threads(1)
    messages = {}
    for name, overrides in {
        "cpu": ("train.sync_batchnorm=true",),
        "mocov2": ("train.sync_batchnorm=true", "method={name: mocov2, queue_size: 32}"),
    }.items():
        try:
            Trainer(tiny_config(*overrides, "train.ddp_timeout_s=60"), Path(out_dir) / name)
        except ConfigError as error:
            messages[name] = str(error)
    if rank == 0:
        (Path(out_dir) / "messages.json").write_text(json.dumps(messages))
    torch.distributed.destroy_process_group()


def test_cpu_ranks_and_shuffled_moco_refuse_it(tmp_path: Path) -> None:
    mp.spawn(_refusals_on_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    messages = json.loads((tmp_path / "messages.json").read_text())
    assert "train.sync_batchnorm=true needs CUDA devices" in messages["cpu"]
    assert "shuffle_bn" in messages["mocov2"] and "undoes it" in messages["mocov2"]
