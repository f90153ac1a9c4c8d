"""look.engine.distributed in one process: the masked mean every contrastive method reduces with,
and the job the environment describes."""

from __future__ import annotations

import pytest
import torch

from look.engine.distributed import global_masked_mean


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_global_masked_mean_is_the_mean_over_valid_items(dtype: torch.dtype) -> None:
    per_item = torch.tensor([1.0, 2.0, float("nan"), 6.0, float("inf")], dtype=dtype)
    per_item.requires_grad_(True)
    valid = torch.tensor([True, True, False, True, False])
    mean = global_masked_mean(per_item, valid)
    assert mean.dtype == dtype and float(mean.detach()) == 3.0  # the NaN and inf do not leak
    (grad,) = torch.autograd.grad(mean, per_item)
    assert grad.tolist() == pytest.approx([1 / 3, 1 / 3, 0.0, 1 / 3, 0.0], rel=1e-7)


def test_global_masked_mean_without_valid_items_is_an_exact_zero_with_a_graph() -> None:
    per_item = torch.tensor([float("nan"), 5.0], requires_grad=True)
    mean = global_masked_mean(per_item, torch.zeros(2, dtype=torch.bool))
    assert float(mean.detach()) == 0.0 and mean.requires_grad
    (grad,) = torch.autograd.grad(mean, per_item)
    assert not grad.any()


_LAUNCH = {
    "RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
}


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({}, False),
        (_LAUNCH, True),
        ({**_LAUNCH, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}, True),  # torchrun, 1 proc
        ({"MASTER_ADDR": "node1", "MASTER_PORT": "29500"}, False),  # a cluster's defaults alone
        ({"WORLD_SIZE": "1", "RANK": "0"}, False),
    ],
)
def test_a_job_of_several_processes_is_recognised_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], expected: bool
) -> None:
    from look.engine.distributed import launched_by_torchrun

    for name in _LAUNCH:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert launched_by_torchrun() is expected


def test_a_launcher_that_sets_only_some_variables_is_refused_naming_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An srun script exporting RANK and WORLD_SIZE without LOCAL_RANK: each process used to
    # train alone, as a job of its own, into the same folder.
    from look.engine.distributed import launched_by_torchrun

    for name, value in _LAUNCH.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(
        ValueError,
        match=r"sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT but not LOCAL_RANK.*SLURM_LOCALID",
    ):
        launched_by_torchrun()
