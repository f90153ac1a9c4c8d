"""Two gloo ranks on CPU: the row gathers of look.engine.distributed return every rank's rows in
rank order, whatever their dtypes, shapes and counts; the masked mean is over both ranks' items."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from look.engine.distributed import (
    gather_rows_and_counts,
    gather_rows_padded,
    global_masked_mean,
)
from tests.ddp import free_port, init_gloo

pytestmark = pytest.mark.ddp

ROWS = {0: 3, 1: 0}  # rank 1 passes no row


def _rows(rank: int) -> list[torch.Tensor]:
    count = ROWS[rank]
    generator = torch.Generator().manual_seed(rank)
    return [
        torch.randn(count, 5, generator=generator),  # fp32 rows
        torch.randint(-(2**40), 2**40, (count,), generator=generator),  # int64, wide values
        torch.randn(count, 2, 3, generator=generator).to(torch.bfloat16),  # 2-byte, 3-D
        torch.rand(count, 4, generator=generator) > 0.5,  # bool
    ]


def _worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, 2, port, timeout_s=60)
    try:
        padded, present = gather_rows_padded(_rows(rank), rows_per_rank=4)
        counted, counts = gather_rows_and_counts(_rows(rank))
        try:
            gather_rows_padded(_rows(0), rows_per_rank=2)  # 3 rows > 2: refused before gathering
            too_many = "no error"
        except ValueError as error:
            too_many = str(error)
        # Rank 0: items 1, 2 and an invalid NaN; rank 1: item 4 and an invalid 9.
        per_item = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 9.0, 0.0]][rank])
        per_item.requires_grad_(True)
        valid = torch.tensor([[True, True, False], [True, False, False]][rank])
        mean = global_masked_mean(per_item, valid)
        (mean_grad,) = torch.autograd.grad(mean, per_item)
        torch.save(
            {"padded": padded, "present": present, "counted": counted, "counts": counts,
             "too_many": too_many, "mean": float(mean), "mean_grad": mean_grad},
            Path(out_dir) / f"rank{rank}.pt",
        )  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_padded_and_counted_gathers_return_every_rows_bytes(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = [torch.cat(parts) for parts in zip(_rows(0), _rows(1), strict=True)]
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["present"].tolist() == [True] * 3 + [False] * 5
        assert result["counts"] == [3, 0]
        for got, counted, want in zip(result["padded"], result["counted"], expected, strict=True):
            assert got.dtype == want.dtype and got.shape[1:] == want.shape[1:]
            assert torch.equal(got[result["present"]], want)  # the real rows, bit for bit
            assert not got[~result["present"]].any()  # padding is zeros
            assert torch.equal(counted, want)
        assert "3 rows, more than rows_per_rank=2" in result["too_many"]
        # Each rank's value is its share, scaled by the world size: DDP's gradient average then
        # gives the gradient of the global mean (1 + 2 + 4) / 3.
        local_sum = [3.0, 4.0][rank]
        assert result["mean"] == pytest.approx(2 * local_sum / 3)
        expected_grad = [[2 / 3, 2 / 3, 0.0], [2 / 3, 0.0, 0.0]][rank]
        assert result["mean_grad"].tolist() == pytest.approx(expected_grad)
