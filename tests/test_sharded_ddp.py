"""Two and three gloo ranks on CPU: a ShardedMemoryBank and sharded_look_loss_terms must give each
rank exactly what one process with a replicated MemoryBank and the global batch gives its queries
(the gradient up to rounding), and the shards together must be that replicated bank."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from look.losses import look_loss_terms
from look.memory import MemoryBank
from look.sharded import ShardedMemoryBank, shard_bounds, sharded_look_loss_terms
from tests.ddp import free_port, init_gloo
from tests.test_sharded import GRADIENT_TOLERANCE

pytestmark = pytest.mark.ddp

NUM_SAMPLES = 37  # divisible by neither 2 nor 3: shards of unequal size
DIM = 8
NUM_CLASSES = 3
TEMPERATURE = 0.1
# (no_positive, storage dtype, k, chunk_size)
CONFIGS = [
    ("drop", torch.float32, 5, 7),
    ("nearest", torch.bfloat16, 2, 65536),
]


def _global_steps(
    world_size: int,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]]:
    """Global batches ``(ids, embeddings, labels, rows_per_rank)``, the same on every rank.

    Batches of different sizes, unequal splits, a rank with an empty batch, and one id on two ranks.
    """
    generator = torch.Generator().manual_seed(2024)
    label_of = torch.randint(0, NUM_CLASSES, (NUM_SAMPLES,), generator=generator)
    steps = []
    for step, batch in enumerate([12, 15, 9, 14, 12]):
        ids = torch.randperm(NUM_SAMPLES, generator=generator)[:batch]
        if step == 3:
            ids[-1] = ids[0]  # the same sample on the first and the last rank
        split = [batch // world_size] * world_size
        split[step % world_size] += batch - sum(split)
        if step == 2:  # one rank passes an empty batch
            split = [0, *split[1:]]
            split[-1] += batch - sum(split)
        embeddings = F.normalize(torch.randn(batch, DIM, generator=generator), dim=1)
        steps.append((ids, embeddings, label_of[ids], split))
    return steps


def _worker(rank: int, world_size: int, port: int, out_dir: str, padded: bool = False) -> None:
    """``padded``: the accelerator's code paths (no host reads; ``host_reads_are_free`` answers
    False) with a bank that knows the per-rank batch size, counting the operations that would
    make the host wait for a CUDA device."""
    import contextlib
    import importlib

    from tests.test_host_sync import SyncCounter

    init_gloo(rank, world_size, port, timeout_s=30)
    if padded:
        for name in ("look.memory", "look.sharded", "look.search", "look.losses.look_loss"):
            importlib.import_module(name).host_reads_are_free = lambda device: False  # type: ignore[attr-defined]
    rows_per_rank = max(max(split) for *_, split in _global_steps(world_size))
    syncs: dict[str, list[str]] = {"update": [], "loss": []}

    @contextlib.contextmanager
    def counted(part: str) -> Iterator[None]:
        if not padded:
            yield
            return
        original_tolist = torch.Tensor.tolist
        tolist_calls: list[str] = []

        def counting_tolist(self: torch.Tensor) -> object:
            tolist_calls.append("tolist")
            return original_tolist(self)

        torch.Tensor.tolist = counting_tolist  # type: ignore[method-assign]
        try:
            with SyncCounter() as counter:
                yield
        finally:
            torch.Tensor.tolist = original_tolist  # type: ignore[method-assign]
        syncs[part].extend(counter.calls + tolist_calls)

    try:
        torch.set_num_threads(1)
        stats: dict[str, object] = {"valid": 0, "swapped_or_dropped": 0, "steps": 0}
        for no_positive, dtype, k, chunk_size in CONFIGS:
            replicated = MemoryBank(NUM_SAMPLES, DIM, dtype=dtype, gather_distributed=False)
            sharded = ShardedMemoryBank(
                NUM_SAMPLES, DIM, dtype=dtype, rows_per_rank=rows_per_rank if padded else None
            )
            assert (sharded.shard_start, sharded.shard_stop) == shard_bounds(
                NUM_SAMPLES, world_size, rank
            )
            row_bytes = replicated.memory_bytes() // NUM_SAMPLES
            assert sharded.memory_bytes() <= replicated.memory_bytes() / world_size + 2 * row_bytes

            for ids, embeddings, labels, split in _global_steps(world_size):
                start = sum(split[:rank])
                local = slice(start, start + split[rank])

                # One process, whole bank, global batch: the reference for this rank's queries.
                reference_query = embeddings.clone().requires_grad_(True)
                expected = look_loss_terms(
                    reference_query,
                    labels,
                    replicated.features,
                    replicated.labels,
                    k=k,
                    temperature=TEMPERATURE,
                    query_indices=ids,
                    memory_ids=replicated.ids,
                    memory_valid=replicated.valid,
                    no_positive=no_positive,  # type: ignore[arg-type]
                    chunk_size=chunk_size,
                )
                expected.loss.sum().backward()

                local_query = embeddings[local].clone().requires_grad_(True)
                with counted("loss"):
                    actual = sharded_look_loss_terms(
                        local_query,
                        labels[local],
                        sharded,
                        k=k,
                        temperature=TEMPERATURE,
                        query_indices=ids[local],
                        no_positive=no_positive,
                        chunk_size=chunk_size,
                    )
                actual.loss.sum().backward()

                for field in expected._fields:
                    if getattr(expected, field) is None:  # inexact: only with a deferred check
                        assert getattr(actual, field) is None, field
                        continue
                    torch.testing.assert_close(
                        getattr(actual, field),
                        getattr(expected, field)[local],
                        rtol=0,
                        atol=0,
                        msg=field,
                    )
                assert local_query.grad is not None and reference_query.grad is not None
                torch.testing.assert_close(
                    local_query.grad, reference_query.grad[local], **GRADIENT_TOLERANCE
                )
                stats["valid"] += int(actual.valid.sum())
                stats["swapped_or_dropped"] += int((~actual.positive_in_topk).sum())
                stats["steps"] += 1

                # Written after the loss, as the LOOK method does.
                replicated.update(ids, embeddings, labels)
                with counted("update"):
                    sharded.update(ids[local], embeddings[local], labels[local])
                union = sharded.gather_full_state()
                for name, value in union.items():
                    assert torch.equal(value, getattr(replicated, name)), name

            restored = ShardedMemoryBank(NUM_SAMPLES, DIM, dtype=dtype)
            restored.load_full_state_(replicated.state_dict())
            assert torch.equal(restored.features, sharded.features)
            assert torch.equal(restored.ids, sharded.ids)
        stats["syncs"] = syncs
        torch.save(stats, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("world_size", "padded"), [(2, False), (3, False), (2, True)])
def test_sharded_bank_and_loss_equal_one_process_with_replicated_bank(
    world_size: int, padded: bool, tmp_path: Path
) -> None:
    mp.spawn(
        _worker,
        args=(world_size, free_port(), str(tmp_path), padded),
        nprocs=world_size,
        join=True,
    )
    stats = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]
    if padded:
        # Neither the write nor the loss reads anything on the host: every exchange has a size
        # known in advance (no rows are fetched; the owners compute and send back values).
        for rank_stats in stats:
            assert rank_stats["syncs"] == {"update": [], "loss": []}
    steps = len(CONFIGS) * len(_global_steps(world_size))
    assert all(rank_stats["steps"] == steps for rank_stats in stats)
    # The comparison covered real work: queries that kept a loss and ones that needed the rule.
    assert sum(rank_stats["valid"] for rank_stats in stats) > 20
    assert sum(rank_stats["swapped_or_dropped"] for rank_stats in stats) > 0


class _BankOwner(torch.nn.Module):
    """What a library user might write: a model holding a sharded bank, wrapped in plain DDP."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(DIM, DIM)
        # Shards of equal size: DDP's broadcast then succeeds, and nothing else would fail.
        self.bank = ShardedMemoryBank(36, DIM)

    def forward(self, ids: torch.Tensor, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.linear(x), dim=1)
        self.bank.update(ids, z.detach(), labels)
        return z.sum()


def _plain_ddp_worker(rank: int, port: int, out_dir: str, broadcast_buffers: bool) -> None:
    init_gloo(rank, 2, port)
    torch.manual_seed(0)
    with warnings.catch_warnings():  # torch >= 2.14 deprecates the flag the bank needs
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.nn.parallel.DistributedDataParallel(
            _BankOwner(), broadcast_buffers=broadcast_buffers
        )
    ids = torch.arange(4) + 4 * rank
    outcome = "trained"
    try:
        model(ids, torch.randn(4, DIM), torch.zeros(4, dtype=torch.long)).backward()
    except RuntimeError as error:
        outcome = str(error)
    (Path(out_dir) / f"rank{rank}.txt").write_text(outcome)
    # One rank stopped in the middle of the step, the other in a collective: tearing the group
    # down then can abort the process (gloo's threads still joinable). Leave without teardown.
    os._exit(0)


def test_a_shard_copied_over_by_ddp_is_refused(tmp_path: Path) -> None:
    # DDP's default broadcast_buffers=True lands rank 0's shard on rank 1. (Without it, as
    # wrap_ddp wraps, the equality tests above train across ranks.)
    mp.spawn(_plain_ddp_worker, args=(free_port(), str(tmp_path), True), nprocs=2, join=True)
    rank1 = (tmp_path / "rank1.txt").read_text()
    assert "rank 1's sharded bank holds rows [0, 18), not its own [18, 36)" in rank1
    assert "broadcast_buffers=False" in rank1  # (rank 0 then fails in its next collective)
