"""Batch samplers whose global batches do not depend on the number of ranks.

:class:`GlobalBatchSampler` draws one permutation per epoch from ``(seed, epoch)`` and cuts it into
global batches; each rank takes a contiguous slice of every global batch. The union over ranks of
step ``s`` is therefore the same set of samples for 1, 2 or 8 processes, so a run can resume with a
different world size, and :meth:`GlobalBatchSampler.set_start_step` resumes exactly mid-epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["EvalShardSampler", "GlobalBatchSampler"]


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator seeded from ``(seed, epoch)``; SeedSequence mixes them into independent streams."""
    mixed = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator()
    generator.manual_seed(int(mixed))
    return generator


def _check_int(name: str, value: int, minimum: int) -> None:
    if type(value) is not int or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_rank(rank: int, world_size: int) -> None:
    _check_int("world_size", world_size, 1)
    if type(rank) is not int or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")


class GlobalBatchSampler(Sampler[list[int]]):
    """Batch sampler yielding this rank's share of each global batch (use as ``batch_sampler=``).

    For epoch ``e`` the dataset order is a permutation of ``range(num_samples)`` drawn from a
    ``torch.Generator`` seeded with ``(seed, e)`` (the identity when ``shuffle=False``). Global batch
    ``s`` is ``perm[s*G:(s+1)*G]`` and rank ``r`` gets ``[r*b:(r+1)*b]`` of it, ``b = G/world_size``.

    With ``drop_last=False`` the last, shorter global batch is split into near-equal contiguous
    parts (sizes differ by at most one); every rank must still get at least one sample.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        *,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        _check_int("num_samples", num_samples, 1)
        _check_int("global_batch_size", global_batch_size, 1)
        _check_rank(rank, world_size)
        _check_int("seed", seed, 0)
        if global_batch_size % world_size != 0:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by "
                f"world_size={world_size}; pick a global batch that is a multiple of the number "
                "of processes"
            )
        if drop_last and global_batch_size > num_samples:
            raise ValueError(
                f"global_batch_size={global_batch_size} is larger than the dataset "
                f"(num_samples={num_samples}), so drop_last=True leaves no batch; use a smaller "
                "batch or drop_last=False"
            )
        remainder = num_samples % global_batch_size
        if not drop_last and 0 < remainder < world_size:
            raise ValueError(
                f"with drop_last=False the last global batch has {remainder} samples, fewer than "
                f"world_size={world_size}, so some rank would get an empty batch; use "
                "drop_last=True or another global_batch_size"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self._epoch = 0
        self._start_step = 0

    @property
    def local_batch_size(self) -> int:
        """Samples per rank in a full global batch."""
        return self.global_batch_size // self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Global batches in one full epoch (ignores the start step)."""
        if self.drop_last:
            return self.num_samples // self.global_batch_size
        return math.ceil(self.num_samples / self.global_batch_size)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def start_step(self) -> int:
        return self._start_step

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation is used; a *different* epoch resets the start step."""
        _check_int("epoch", epoch, 0)
        if epoch != self._epoch:
            self._start_step = 0
        self._epoch = epoch

    def set_start_step(self, step: int) -> None:
        """Skip the first ``step`` global batches of the current epoch (exact mid-epoch resume).

        Call after :meth:`set_epoch` of the resumed epoch; moving to another epoch resets it to 0.
        """
        if type(step) is not int or not 0 <= step <= self.steps_per_epoch:
            raise ValueError(
                f"start step must be an int in [0, steps_per_epoch={self.steps_per_epoch}], "
                f"got {step!r}"
            )
        self._start_step = step

    def _epoch_order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=_epoch_generator(self.seed, self._epoch))

    def __iter__(self) -> Iterator[list[int]]:
        order = self._epoch_order()
        size = self.global_batch_size
        for step in range(self._start_step, self.steps_per_epoch):
            global_batch = order[step * size : (step + 1) * size]
            # tensor_split gives the exact contiguous [r*b:(r+1)*b] slices for a full batch.
            yield torch.tensor_split(global_batch, self.world_size)[self.rank].tolist()

    def __len__(self) -> int:
        return self.steps_per_epoch - self._start_step


class EvalShardSampler(Sampler[int]):
    """Contiguous shard of ``range(num_samples)`` for this rank, *without* padding duplicates.

    Shard sizes differ by at most one (the first ``num_samples % world_size`` ranks get one more),
    so gathering every rank's results in rank order gives each sample exactly once, in order. The
    caller must gather with uneven sizes (e.g. pad to the largest shard and trim).
    """

    def __init__(self, num_samples: int, rank: int, world_size: int) -> None:
        _check_int("num_samples", num_samples, 0)
        _check_rank(rank, world_size)
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        base, extra = divmod(num_samples, world_size)
        self.start = rank * base + min(rank, extra)
        self.stop = self.start + base + (1 if rank < extra else 0)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start
