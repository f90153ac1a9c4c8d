"""Thin helpers over ``torch.distributed``: every function works unchanged in a single process.

Launching is left to ``torchrun``; :func:`init_distributed` only reads the environment it sets.
"""

from __future__ import annotations

import datetime
import math
import os
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def rank_seed(seed: int, rank: int) -> int:
    """The seed of ``rank``'s own random draws (dropout, drop-path) once the model is built alike
    on every rank: rank 0 keeps ``seed``, so a one-process run draws as it always did; the other
    ranks get seeds far from any small one."""
    return seed if rank == 0 else (seed + rank * 0x9E3779B97F4A7C15) % 2**63


# What torchrun sets for every worker; init_process_group's env:// reads the last two.
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """True when the environment describes a process of a multi-process job (as ``torchrun``
    sets it). A launcher that sets only some of the variables (an ``srun`` script exporting
    ``RANK`` and ``WORLD_SIZE`` but not ``LOCAL_RANK``) gets a ValueError naming the missing
    ones: each process would otherwise train alone, as a job of its own."""
    missing = [name for name in _LAUNCH_VARIABLES if name not in os.environ]
    if not missing:
        return True
    if os.environ.get("WORLD_SIZE", "1").strip() == "1":
        return False  # no job of several processes is described (MASTER_* alone are not one)
    present = [name for name in _LAUNCH_VARIABLES if name in os.environ]
    raise ValueError(
        f"the environment sets {', '.join(present)} but not {', '.join(missing)}: a "
        "multi-process job needs all of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and "
        "MASTER_PORT (torchrun sets them; under srun without torchrun, export e.g. "
        "LOCAL_RANK=$SLURM_LOCALID, RANK=$SLURM_PROCID and WORLD_SIZE=$SLURM_NTASKS)"
    )


def init_distributed(device_type: str, timeout_s: float = 600.0) -> torch.device:
    """Join the process group set up by ``torchrun`` (if any) and return this rank's device.

    A finite ``timeout_s`` makes a job whose peer died stop instead of hanging forever.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(device_type)
    if launched_by_torchrun() and not is_distributed():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def wrap_ddp(
    module: torch.nn.Module, device: torch.device, *, find_unused_parameters: bool = False
) -> DistributedDataParallel:
    """``module`` under DDP as a method needs it: buffers are never broadcast from rank 0.

    A memory keeps itself identical on every rank through its own gathers, and a sharded bank's
    buffers differ between ranks by design, so DDP must not overwrite them.
    """
    with warnings.catch_warnings():
        # torch >= 2.14 deprecates broadcast_buffers for forward_sync_buffers, which still
        # syncs buffers at init and would overwrite every rank's sharded-bank shard with rank 0's
        # (torch 2.11 lacks it): the deprecated flag is the correct one.
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*deprecated")
        return DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=find_unused_parameters,
        )


def broadcast_buffers_from_rank_0(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers of ``module`` (batch-norm running statistics): the ones
    its checkpoints and exports hold. Without synchronised batch norm each rank's statistics
    follow its own images, and a rank evaluating its shard in eval mode would measure a model
    that no rank saves. (A collective; nothing outside a process group.)"""
    if not is_distributed():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def synchronise_batchnorm(module: torch.nn.Module) -> int:
    """Turn every batch-norm layer below ``module`` into its synchronised form, in place,
    keeping its parameter and buffer objects (an optimizer built before still holds them);
    returns how many. timm's norm+activation layers keep their activation (torch's own
    conversion would drop it). Outside a process group a synchronised layer computes what the
    plain one does."""
    from timm.layers import convert_sync_batchnorm

    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        raise TypeError("synchronise_batchnorm converts the layers below a module, not a norm")
    count = sum(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        and not isinstance(m, torch.nn.SyncBatchNorm)
        for m in module.modules()
    )
    convert_sync_batchnorm(module)
    return count


def cleanup_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (no gradient); returns a new tensor."""
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped tensors from all ranks along dim 0, in rank order."""
    if not is_distributed():
        return tensor.detach()
    tensor = tensor.detach().contiguous()
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)


def gather_rows_no_grad(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Concatenate each tensor over ranks along dim 0, in rank order; ranks may hold different
    numbers of rows (all tensors of one rank share that count)."""
    return gather_rows_and_counts(tensors)[0]


def gather_rows_and_counts(
    tensors: Sequence[torch.Tensor],
) -> tuple[list[torch.Tensor], list[int]]:
    """:func:`gather_rows_no_grad`, and the number of rows each rank contributed.

    :func:`gather_no_grad` needs equal shapes on all ranks, so the row
    counts are exchanged first (one host read) and shorter slices are padded, then trimmed after
    the gather.
    """
    if not is_distributed():
        return [tensor.detach() for tensor in tensors], [tensors[0].shape[0]]
    local_rows = tensors[0].shape[0]
    device = tensors[0].device
    row_counts = gather_no_grad(torch.tensor([local_rows], dtype=torch.int64, device=device))
    counts = row_counts.tolist()
    max_rows = max(counts)
    gathered: list[torch.Tensor] = []
    for tensor in tensors:
        tensor = tensor.detach()
        if all(count == max_rows for count in counts):
            gathered.append(gather_no_grad(tensor))
            continue
        padded = tensor.new_zeros((max_rows, *tensor.shape[1:]))
        padded[:local_rows] = tensor
        per_rank = gather_no_grad(padded).view(get_world_size(), max_rows, *tensor.shape[1:])
        gathered.append(torch.cat([per_rank[r, :count] for r, count in enumerate(counts)], dim=0))
    return gathered, counts


def gather_rows_padded(
    tensors: Sequence[torch.Tensor], rows_per_rank: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """:func:`gather_rows_no_grad` with no host read: every rank pads its rows to
    ``rows_per_rank``, so the gather needs no row counts.

    Returns each tensor gathered as ``(world_size * rows_per_rank, ...)`` in rank order, and a
    bool ``present`` of the same length marking the real rows (the rest are zeros). In a single
    process nothing is padded and ``present`` is all true. Raises ``ValueError`` if this rank has
    more rows than ``rows_per_rank`` (a programming error: the caller sized it from the batch).
    """
    if isinstance(rows_per_rank, bool) or not isinstance(rows_per_rank, int) or rows_per_rank < 0:
        raise ValueError(f"rows_per_rank must be a non-negative int, got {rows_per_rank!r}")
    local_rows = tensors[0].shape[0]
    device = tensors[0].device
    if not is_distributed():
        present = torch.ones(local_rows, dtype=torch.bool, device=device)
        return [tensor.detach() for tensor in tensors], present
    if local_rows > rows_per_rank:
        raise ValueError(
            f"this rank has {local_rows} rows, more than rows_per_rank={rows_per_rank} (the "
            "per-rank batch size the memory was built for)"
        )
    present = torch.arange(rows_per_rank, device=device) < local_rows
    # One collective for everything: each tensor's rows as raw bytes side by side, then the
    # present mask as one byte (a small all-gather costs its latency, whatever it carries).
    parts = [tensor.detach().contiguous() for tensor in tensors]
    widths = [math.prod(part.shape[1:]) * part.element_size() for part in parts]
    packed = torch.zeros((rows_per_rank, sum(widths) + 1), dtype=torch.uint8, device=device)
    column = 0
    for part, width in zip(parts, widths, strict=True):
        row_values = part.reshape(local_rows, width // part.element_size())
        packed[:local_rows, column : column + width] = row_values.view(torch.uint8)
        column += width
    packed[:, column] = present.to(torch.uint8)
    every_rank = gather_no_grad(packed)
    gathered, column = [], 0
    for part, width in zip(parts, widths, strict=True):
        raw = every_rank[:, column : column + width].contiguous()
        gathered.append(raw.view(part.dtype).reshape(-1, *part.shape[1:]))
        column += width
    return gathered, every_rank[:, column].bool()


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Like :func:`gather_no_grad`, but gradients flow back to each rank's own slice (summed
    over the ranks whose losses used it). Every rank passes the same shape."""
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient of this rank's slice
    (``torch.distributed.nn.functional.all_gather`` does the same, and is deprecated)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        return gather_no_grad(tensor)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        world_size, rank = get_world_size(), get_rank()
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            own = grad.new_empty((grad.shape[0] // world_size, *grad.shape[1:]))
            dist.reduce_scatter_tensor(own, grad, op=dist.ReduceOp.SUM)
            return own
        # gloo has no reduce-scatter: sum the whole gradient, keep this rank's slice.
        summed = grad.clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed.chunk(world_size, dim=0)[rank].contiguous()


class Anchors(NamedTuple):
    """How many of a loss's items, over all ranks, were valid (``count``, a 0-d int64 tensor on
    the device) out of how many (``total``): what a mean over the valid items weighs when the
    means of a step's micro-batches are combined into the mean over all of the step's valid
    items (``StepOutput.anchors``)."""

    count: torch.Tensor
    total: int


def global_masked_mean(per_item: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_item[valid]`` over *all ranks'* valid items.

    DDP averages gradients over ranks, so the local sum is scaled by the world size; the result has
    the same gradient as one process computing the mean over the global batch. With no valid item
    anywhere it is an exact zero that still carries a graph (never NaN).
    """
    return global_masked_mean_and_anchors(per_item, valid)[0]


def global_masked_mean_and_anchors(
    per_item: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, Anchors]:
    """:func:`global_masked_mean` and its :class:`Anchors` (no extra operation: the count is the
    mean's own denominator)."""
    # No host sync: with no valid item anywhere the local sum is an exact zero and the count is
    # clamped to 1, so the result is 0 with a graph. torch.where keeps an inf/NaN in an invalid
    # item from leaking through a multiplication by zero.
    local_sum = torch.where(valid, per_item, 0.0).sum()
    count = valid.sum()  # int64: exact
    if is_distributed():
        count = all_reduce_sum(count)
    world_size = get_world_size()
    # (few kernels: on a GPU each op here is one, whatever it computes)
    mean = local_sum * (world_size / count.clamp(min=1).to(per_item.dtype))
    # Every rank holds as many items (batches are padded alike), so the total is the same on all.
    return mean, Anchors(count, valid.numel() * world_size)
