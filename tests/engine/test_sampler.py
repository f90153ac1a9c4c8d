from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from look.engine.sampler import EvalShardSampler, GlobalBatchSampler


def _flatten(lists: list[list[int]]) -> list[int]:
    return list(itertools.chain.from_iterable(lists))


def _global_batches(
    num_samples: int, batch: int, world_size: int, epoch: int = 0, **kwargs: object
) -> list[list[int]]:
    """Concatenate every rank's share of each step, in rank order."""
    per_rank = []
    for rank in range(world_size):
        sampler = GlobalBatchSampler(
            num_samples, batch, rank=rank, world_size=world_size, seed=7, **kwargs
        )
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
    steps = {len(batches) for batches in per_rank}
    assert len(steps) == 1, "every rank must take the same number of steps"
    return [_flatten([batches[s] for batches in per_rank]) for s in range(steps.pop())]


@pytest.mark.parametrize("world_size", [2, 4])
def test_global_batches_do_not_depend_on_world_size(world_size: int) -> None:
    single = _global_batches(103, 8, 1)
    assert _global_batches(103, 8, world_size) == single
    assert len(single) == 103 // 8
    assert all(len(batch) == 8 for batch in single)
    flat = _flatten(single)
    assert len(set(flat)) == len(flat)  # no sample twice in an epoch
    assert set(flat) <= set(range(103))


def test_rank_gets_contiguous_slice_of_global_batch() -> None:
    full = _global_batches(40, 8, 1)
    sampler = GlobalBatchSampler(40, 8, rank=2, world_size=4, seed=7)
    assert sampler.local_batch_size == 2
    assert list(sampler) == [batch[4:6] for batch in full]


def test_deterministic_per_epoch_and_different_across_epochs() -> None:
    epoch0 = _global_batches(64, 16, 2, epoch=0)
    assert _global_batches(64, 16, 2, epoch=0) == epoch0
    epoch1 = _global_batches(64, 16, 2, epoch=1)
    assert epoch1 != epoch0
    assert sorted(_flatten(epoch1)) == list(range(64))
    other_seed = GlobalBatchSampler(64, 16, rank=0, world_size=1, seed=8)
    assert list(other_seed) != _global_batches(64, 16, 1)


def test_no_shuffle_is_dataset_order() -> None:
    sampler = GlobalBatchSampler(10, 4, rank=1, world_size=2, seed=0, shuffle=False)
    assert list(sampler) == [[2, 3], [6, 7]]


def test_set_start_step_resumes_tail_of_epoch() -> None:
    uninterrupted = GlobalBatchSampler(100, 12, rank=1, world_size=3, seed=3)
    uninterrupted.set_epoch(2)
    full = list(uninterrupted)
    resumed = GlobalBatchSampler(100, 12, rank=1, world_size=3, seed=3)
    resumed.set_epoch(2)
    resumed.set_start_step(5)
    assert len(resumed) == len(full) - 5
    assert list(resumed) == full[5:]
    resumed.set_epoch(2)  # same epoch again keeps the start step
    assert len(resumed) == len(full) - 5
    resumed.set_epoch(3)  # a new epoch starts from its beginning
    assert resumed.start_step == 0
    assert len(resumed) == resumed.steps_per_epoch == 100 // 12


def test_resume_with_different_world_size() -> None:
    """The first 3 steps ran on 4 ranks; the rest of the epoch on 2 ranks equals one rank's run."""
    single = _global_batches(96, 8, 1, epoch=1)
    first_part = _global_batches(96, 8, 4, epoch=1)[:3]
    rest = []
    for rank in range(2):
        sampler = GlobalBatchSampler(96, 8, rank=rank, world_size=2, seed=7)
        sampler.set_epoch(1)
        sampler.set_start_step(3)
        rest.append(list(sampler))
    tail = [a + b for a, b in zip(rest[0], rest[1], strict=True)]
    assert first_part + tail == single


def test_drop_last_false_splits_last_batch() -> None:
    batches = _global_batches(22, 8, 2, drop_last=False)
    assert [len(b) for b in batches] == [8, 8, 6]
    assert sorted(_flatten(batches)) == list(range(22))
    sampler = GlobalBatchSampler(22, 8, rank=1, world_size=2, seed=7, drop_last=False)
    assert [len(b) for b in sampler] == [4, 4, 3]
    assert sampler.steps_per_epoch == 3


def test_errors_are_clear() -> None:
    with pytest.raises(ValueError, match=r"global_batch_size=10 .*world_size=4"):
        GlobalBatchSampler(100, 10, rank=0, world_size=4, seed=0)
    with pytest.raises(ValueError, match=r"global_batch_size=64.*num_samples=50"):
        GlobalBatchSampler(50, 64, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="rank"):
        GlobalBatchSampler(50, 8, rank=2, world_size=2, seed=0)
    with pytest.raises(ValueError, match="empty batch"):
        GlobalBatchSampler(17, 8, rank=0, world_size=4, seed=0, drop_last=False)
    with pytest.raises(ValueError, match="seed"):
        GlobalBatchSampler(50, 8, rank=0, world_size=1, seed=-1)
    sampler = GlobalBatchSampler(50, 8, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="steps_per_epoch=6"):
        sampler.set_start_step(7)
    with pytest.raises(ValueError, match="epoch"):
        sampler.set_epoch(-1)


def test_works_as_dataloader_batch_sampler() -> None:
    dataset = TensorDataset(torch.arange(30))
    sampler = GlobalBatchSampler(30, 6, rank=0, world_size=2, seed=1)
    loaded = [batch[0].tolist() for batch in DataLoader(dataset, batch_sampler=sampler)]
    assert loaded == list(sampler)


@pytest.mark.parametrize(("num_samples", "world_size"), [(10, 1), (10, 3), (2, 4), (0, 2), (17, 4)])
def test_eval_shards_cover_every_index_exactly_once(num_samples: int, world_size: int) -> None:
    shards = [list(EvalShardSampler(num_samples, r, world_size)) for r in range(world_size)]
    assert _flatten(shards) == list(range(num_samples))
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == [len(EvalShardSampler(num_samples, r, world_size)) for r in range(world_size)]


def test_eval_shard_errors() -> None:
    with pytest.raises(ValueError, match="rank"):
        EvalShardSampler(10, 3, 3)
    with pytest.raises(ValueError, match="num_samples"):
        EvalShardSampler(-1, 0, 1)
