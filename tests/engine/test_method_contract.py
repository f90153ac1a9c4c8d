"""What the trainer checks of a method someone adds (one file plus one registry line): its
forward's StepOutput, its state against a checkpoint, its buffers across ranks, and DDP with
parameters a step leaves unused."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from look.config import ConfigError
from look.engine.trainer import TrainingStepError, pretrain
from look.methods import METHODS, Batch, StepOutput
from look.methods.ce import CEOptions, CrossEntropy
from tests.ddp import free_port, set_torchrun_environment
from tests.engine.test_trainer import tiny_config


@dataclass
class _ModeOptions(CEOptions):
    mode: str = "ok"


class _Contract(CrossEntropy):
    """CE whose forward breaks the contract as ``mode`` says; ``extra`` adds a buffer; ``local``
    updates a buffer from this rank's batch alone; ``unused`` owns a parameter no loss uses."""

    name = "contract"
    Options = _ModeOptions  # type: ignore[assignment]

    def __init__(self, options: Any, backbone: nn.Module, feature_dim: int, ctx: Any) -> None:
        super().__init__(options, backbone, feature_dim, ctx)
        if options.mode == "extra":
            self.register_buffer("extra", torch.zeros(3))
        if options.mode == "local":
            self.register_buffer("label_mean", torch.zeros(()))
        if options.mode == "unused":
            self.unused = nn.Linear(2, 2)

    def build_projector(self) -> tuple[nn.Module, int]:
        return nn.Identity(), self.feature_dim

    def forward(self, batch: Batch) -> Any:
        out = super().forward(batch)
        mode = self.options.mode
        if mode == "tuple":
            return (out.loss, out.metrics)
        if mode == "vector":
            return StepOutput(out.loss.repeat(2), out.metrics)
        if mode == "detached":
            return StepOutput(out.loss.detach(), out.metrics)
        if mode == "float_metric":
            return StepOutput(out.loss, {**out.metrics, "acc": 0.5})
        if mode == "local":  # this rank's labels only: differs between ranks
            self.label_mean.mul_(0.5).add_(batch.labels.float().mean(), alpha=0.5)
        return out


class _ContractWithAnExtraBuffer(_Contract):
    """The same method after its code changed: one buffer more."""

    def __init__(self, options: Any, backbone: nn.Module, feature_dim: int, ctx: Any) -> None:
        super().__init__(options, backbone, feature_dim, ctx)
        self.register_buffer("extra", torch.zeros(3))


class _UnusedButDeclared(_Contract):
    ddp_find_unused_parameters = True


CONTRACT = ("method={name: contract}",)


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(METHODS, "contract", _Contract)


@pytest.mark.parametrize(
    ("mode", "problem"),
    [
        ("tuple", "returned a tuple, not a look.methods.StepOutput"),
        ("vector", "returned a loss of shape/type (2,)"),
        ("detached", "returned a loss that does not require grad"),
        ("float_metric", "returned metrics that are not tensors: ['acc']"),
    ],
)
def test_a_forward_that_breaks_the_contract_is_named(
    tmp_path: Path, mode: str, problem: str
) -> None:
    with pytest.raises(TrainingStepError, match=re.escape(f"method 'contract' {problem}")):
        pretrain(tiny_config(f"method={{name: contract, mode: {mode}}}"), tmp_path / "run")


def test_a_checkpoint_that_no_longer_fits_the_method_is_refused_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from look.engine.trainer import Trainer

    pretrain(tiny_config(*CONTRACT, "train.max_steps=2"), tmp_path / "run")
    monkeypatch.setitem(METHODS, "contract", _ContractWithAnExtraBuffer)
    with pytest.raises(ConfigError, match=r"does not fit method 'contract'.*missing extra"):
        Trainer(tiny_config(*CONTRACT), tmp_path / "run").plan()  # the dry run says so too
    with pytest.raises(ConfigError, match=r"does not fit method 'contract'.*missing extra"):
        pretrain(tiny_config(*CONTRACT), tmp_path / "run")


_CLASSES = {"plain": _Contract, "declared": _UnusedButDeclared}


def _run_on_rank(rank: int, port: int, out_dir: str, mode: str, cls: str) -> None:
    import warnings

    METHODS["contract"] = _CLASSES[cls]  # a process of its own: register here too
    set_torchrun_environment(rank, 2, port)
    torch.set_num_threads(1)
    outcome = "trained"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pretrain(
                tiny_config(f"method={{name: contract, mode: {mode}}}", "train.max_steps=4"),
                Path(out_dir) / "run",
            )
        except TrainingStepError as error:
            outcome = str(error)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps([outcome, messages]))
    torch.distributed.destroy_process_group()


def test_buffers_that_differ_between_ranks_are_named_at_the_checkpoint(tmp_path: Path) -> None:
    mp.spawn(_run_on_rank, args=(free_port(), str(tmp_path), "local", "plain"), nprocs=2)
    outcome, messages = json.loads((tmp_path / "rank0.json").read_text())
    assert outcome == "trained"
    assert any("buffers that differ between ranks" in m and "label_mean" in m for m in messages)


def test_unused_parameters_under_ddp_name_the_class_attribute(tmp_path: Path) -> None:
    mp.spawn(_run_on_rank, args=(free_port(), str(tmp_path), "unused", "plain"), nprocs=2)
    outcome, _ = json.loads((tmp_path / "rank0.json").read_text())
    assert "set its class attribute ddp_find_unused_parameters = True" in outcome
    # Declared, the same method trains.
    mp.spawn(_run_on_rank, args=(free_port(), str(tmp_path / "ok"), "unused", "declared"), nprocs=2)
    outcome, messages = json.loads((tmp_path / "ok" / "rank0.json").read_text())
    assert outcome == "trained"
    assert not any("differ between ranks" in m for m in messages), "CE's state agrees"
