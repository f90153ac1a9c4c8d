"""look.engine.distributed in one process: the masked mean every contrastive method reduces with."""

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
