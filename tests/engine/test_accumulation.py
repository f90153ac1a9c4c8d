"""Gradient accumulation (``optim.grad_accum_steps``): a global batch cut into micro-batches must
train like the whole batch at once, given a backbone whose outputs do not depend on the batch
(ConvNeXt's layer norms; batch norm's statistics would differ by design)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from look.config import ConfigError
from look.engine.trainer import Trainer, pretrain
from tests.engine.test_trainer import pretrain_on_rank, tiny_config, train_losses

# Float rounding only: the same sums over samples, grouped by micro-batch.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
NO_BATCH_NORM = (
    "model.backbone=convnext_atto",
    "data.synthetic_image_size=32",
    "train.max_steps=4",
    "train.checkpoint_every_steps=100",
)
# Every query keeps a loss (a warm memory, the nearest-positive rule); no batch norm in the head.
LOOK = ("method.memory_init=warmup", "method.no_positive=nearest", "method.head_batch_norm=false")


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1]
    return torch.load(last, weights_only=True)["model"]


def _assert_same_training(first: Path, second: Path) -> None:
    losses, other = train_losses(first), train_losses(second)
    assert losses.keys() == other.keys() and len(losses) == 4
    torch.testing.assert_close(
        torch.tensor(list(other.values())), torch.tensor(list(losses.values())), **TOLERANCE
    )
    state, other_state = _final_state(first), _final_state(second)
    assert state.keys() == other_state.keys()
    for name, value in state.items():
        if value.is_floating_point():
            torch.testing.assert_close(other_state[name], value, **TOLERANCE, msg=name)
        else:
            assert torch.equal(other_state[name], value), name


MOCO = ("method={name: mocov2, queue_size: 64, head_batch_norm: false}",)


@pytest.mark.parametrize(
    "method", [("method={name: ce}",), LOOK, MOCO], ids=["ce", "look_memory_bank", "mocov2_queue"]
)
def test_micro_batches_train_like_the_whole_batch(tmp_path: Path, method: tuple[str, ...]) -> None:
    pretrain(tiny_config(*NO_BATCH_NORM, *method), tmp_path / "whole")
    pretrain(tiny_config(*NO_BATCH_NORM, *method, "optim.grad_accum_steps=4"), tmp_path / "micro")
    # LOOK's memory and MoCo's queue too: the micro-batches of a step read them as they were
    # before the step, and their rows are written after it.
    _assert_same_training(tmp_path / "whole", tmp_path / "micro")
    # Not vacuous: training moved the weights and (for LOOK) filled the memory.
    start = Trainer(tiny_config(*NO_BATCH_NORM, *method), tmp_path / "unused").method.state_dict()
    trained = _final_state(tmp_path / "whole")
    assert any(
        not torch.allclose(trained[name], value)
        for name, value in start.items()
        if value.is_floating_point()
    )


# The default rules: queries without a neighbour of their class are dropped, so micro-batches
# average over different numbers of queries (the trainer weights them by their counts).
LOOK_DROPPING = ("method.memory_init=warmup", "method.head_batch_norm=false", "method.k=2")


def test_micro_batches_weigh_their_losses_by_their_valid_queries(tmp_path: Path) -> None:
    pretrain(tiny_config(*NO_BATCH_NORM, *LOOK_DROPPING), tmp_path / "whole")
    pretrain(
        tiny_config(*NO_BATCH_NORM, *LOOK_DROPPING, "optim.grad_accum_steps=2"), tmp_path / "micro"
    )
    # Not vacuous: some steps dropped some of their queries, not all.
    rows = [
        json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    ]
    dropped = [row["dropped_frac"] for row in rows if "dropped_frac" in row]
    assert any(0.0 < fraction < 1.0 for fraction in dropped), dropped
    _assert_same_training(tmp_path / "whole", tmp_path / "micro")
    # The logged look_loss is the loss (no CE term) in both: weighted like it, not a plain mean
    # of the micro-batches' means.
    for run in ("whole", "micro"):
        logged = [
            json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        ]
        pairs = [(row["look_loss"], row["loss"]) for row in logged if "look_loss" in row]
        assert len(pairs) == 4, run
        look_losses, losses = (torch.tensor(column) for column in zip(*pairs, strict=True))
        torch.testing.assert_close(look_losses, losses, **TOLERANCE, msg=run)


def test_micro_batches_see_the_memory_of_before_the_step(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(*LOOK, "optim.grad_accum_steps=2"), tmp_path / "run")
    assert trainer.method.defer_memory_writes and trainer.micro_batch == 8
    assert trainer.method.memory.rows_per_rank == 8  # the memory is written per micro-batch
    trainer.method.train()
    batch = next(iter(trainer._loader(0, 0)))
    before = trainer.method.memory.features.clone()
    seen_by_forward = []
    forward = trainer.method.forward

    def recording_forward(micro_batch: Any) -> Any:
        seen_by_forward.append(trainer.method.memory.features.clone())
        return forward(micro_batch)

    trainer.method.forward = recording_forward  # type: ignore[method-assign]
    trainer._step(0, batch)
    assert len(seen_by_forward) == 2
    for memory_seen in seen_by_forward:  # the second micro-batch too: nothing written before it
        assert torch.equal(memory_seen, before)
    trainer.method.after_optimizer_step(0.1)
    written = (trainer.method.memory.features != before).any(dim=1)
    assert set(written.nonzero().squeeze(1).tolist()) == set(batch.indices.tolist())


def test_a_batch_that_does_not_split_evenly_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"grad_accum_steps=3 micro-batches; pick a multiple"):
        Trainer(tiny_config("optim.grad_accum_steps=3"), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"optim\.grad_accum_steps must be > 0"):
        tiny_config("optim.grad_accum_steps=0")


def test_a_run_may_resume_with_another_number_of_micro_batches(tmp_path: Path) -> None:
    # Moving to a smaller GPU: the same global batch in more micro-batches. With a
    # batch-independent model the resumed run trains as if nothing had changed.
    whole = pretrain(tiny_config(*NO_BATCH_NORM, *LOOK), tmp_path / "whole")
    assert whole.global_step == 4
    first = tiny_config(
        *NO_BATCH_NORM, *LOOK, "train.max_steps=2", "train.checkpoint_every_steps=1"
    )
    pretrain(first, tmp_path / "moved")
    resumed = pretrain(
        tiny_config(*NO_BATCH_NORM, *LOOK, "optim.grad_accum_steps=2"), tmp_path / "moved"
    )
    assert resumed.global_step == 4
    _assert_same_training(tmp_path / "whole", tmp_path / "moved")


@pytest.mark.ddp
def test_two_ranks_with_micro_batches_train_like_one_process(tmp_path: Path) -> None:
    """DDP all-reduces once per step (``no_sync`` for the earlier micro-batches); the memory
    writes of both ranks' micro-batches follow the step."""
    import torch.multiprocessing as mp

    from tests.ddp import free_port

    pretrain(tiny_config(*NO_BATCH_NORM, *LOOK), tmp_path / "one")
    overrides = (*NO_BATCH_NORM, *LOOK, "optim.grad_accum_steps=2")
    mp.spawn(
        pretrain_on_rank, args=(free_port(), str(tmp_path / "two"), overrides), nprocs=2, join=True
    )
    _assert_same_training(tmp_path / "one", tmp_path / "two")
