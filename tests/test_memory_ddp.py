"""Two gloo ranks on CPU: memories must be identical on every rank and equal to one process
that was fed the global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from look.memory import FeatureMemory, MemoryBank, MemoryQueue
from tests.ddp import free_port, init_gloo

pytestmark = pytest.mark.ddp

WORLD_SIZE = 2
NUM_SAMPLES = 12
DIM = 8
QUEUE_CAPACITY = 7


def _make_memories(gather_distributed: bool = True) -> dict[str, FeatureMemory]:
    return {
        "bank_fp32": MemoryBank(
            NUM_SAMPLES, DIM, momentum=0.5, gather_distributed=gather_distributed
        ),
        "bank_fp16": MemoryBank(
            NUM_SAMPLES,
            DIM,
            momentum=0.5,
            dtype=torch.float16,
            gather_distributed=gather_distributed,
        ),
        "bank_bf16_overwrite": MemoryBank(
            NUM_SAMPLES,
            DIM,
            momentum=0.0,
            dtype=torch.bfloat16,
            gather_distributed=gather_distributed,
        ),
        "queue": MemoryQueue(QUEUE_CAPACITY, DIM, gather_distributed=gather_distributed),
    }


def _global_steps() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """Global batches ``(ids, features, labels, rows_on_rank_0)``; rank 1 gets the rest.

    Covers equal and unequal splits, an empty slice on one rank, and the same id on both ranks
    (the last occurrence in rank order must win on every rank).
    """
    generator = torch.Generator().manual_seed(1234)
    steps = []
    for ids, rows_on_rank_0 in [
        ([0, 1, 2, 3, 4, 5], 3),
        ([2, 6, 7, 0, 8, 9, 10, 11], 2),
        ([5, 3, 5, 1, 3], 1),  # duplicates inside a rank and across ranks
        ([4, 9, 10], 3),  # rank 1 passes an empty batch
        ([11, 0, 6, 2], 2),
    ]:
        features = torch.randn(len(ids), DIM, generator=generator) * 3.0
        labels = torch.randint(0, 3, (len(ids),), generator=generator)
        steps.append((torch.tensor(ids), features, labels, rows_on_rank_0))
    return steps


def _feed_global_steps(memories: dict[str, FeatureMemory], rank: int) -> dict[str, list[str]]:
    """Each rank updates every memory with its slice of each global step; returns the operations
    of each memory's updates that would make the host wait for a CUDA device."""
    from tests.test_host_sync import SyncCounter

    syncs: dict[str, list[str]] = {name: [] for name in memories}
    for ids, features, labels, rows_on_rank_0 in _global_steps():
        part = slice(0, rows_on_rank_0) if rank == 0 else slice(rows_on_rank_0, None)
        for name, memory in memories.items():
            with SyncCounter() as counter:
                memory.update(ids[part], features[part], labels[part])
            syncs[name] += counter.calls
    return syncs


def _nan_row_on_rank_1(memories: dict[str, FeatureMemory], rank: int) -> dict[str, str]:
    """Every rank must refuse a NaN row that only rank 1 passes (values are checked after the
    gather); returns each memory's error message (a late check is settled at once)."""
    errors: dict[str, str] = {}
    features = torch.ones(2, DIM)
    if rank == 1:
        features[1, 0] = float("nan")
    for name, memory in memories.items():
        try:
            memory.update(torch.tensor([rank, rank + 2]), features, torch.tensor([0, 0]))
            memory.settle_checks()
        except ValueError as error:
            errors[name] = str(error)
    return errors


def _single_process_states(memories: dict[str, FeatureMemory]) -> dict[str, dict]:
    """The memories after one process was fed every global step whole."""
    for ids, features, labels, _ in _global_steps():
        for memory in memories.values():
            memory.update(ids, features, labels)
    return {name: memory.state_dict() for name, memory in memories.items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, WORLD_SIZE, port, timeout_s=60)
    try:
        torch.set_num_threads(1)
        memories = _make_memories()
        _feed_global_steps(memories, rank)
        # On the CPU neither rank may write anything of the refused batch.
        errors = _nan_row_on_rank_1(memories, rank)
        state = {name: memory.state_dict() for name, memory in memories.items()}
        torch.save({"state": state, "errors": errors}, Path(out_dir) / f"rank{rank}.pt")
        # Both ranks done before either tears gloo down: a rank destroying its group while the
        # other still talked to it died once of "terminate called without an active exception".
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_memories_identical_across_ranks_and_equal_to_single_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]

    for name, expected in _single_process_states(_make_memories(False)).items():
        assert expected["valid"].any(), name
        for rank, result in enumerate(results):
            state = result["state"][name]
            assert state.keys() == expected.keys()
            for key, value in expected.items():
                assert state[key].dtype == value.dtype, (name, rank, key)
                assert torch.equal(state[key], value), (name, rank, key)
            # Every rank saw the NaN of rank 1 and refused the write.
            assert "1 of 4 feature rows" in result["errors"][name], (name, rank)

    # The fp16 bank holds real, renormalised rows (not an all-zero set that trivially agrees).
    fp16_rows = results[0]["state"]["bank_fp16"]["features"]
    assert fp16_rows.dtype == torch.float16
    assert torch.allclose(fp16_rows.float().norm(dim=1), torch.ones(NUM_SAMPLES), atol=2e-3)
    assert torch.equal(fp16_rows, results[1]["state"]["bank_fp16"]["features"])
    # Id 5 is written at step 0 (row 5) and twice at step 2 (rows 0 and 2, on ranks 0 and 1):
    # the bank mixes in the later one, once.
    steps = _global_steps()
    first_write = F.normalize(steps[0][1][5], dim=0)
    last_duplicate = F.normalize(steps[2][1][2], dim=0)
    expected_row_5 = F.normalize(0.5 * first_write + 0.5 * last_duplicate, dim=0)
    for result in results:
        assert torch.allclose(
            result["state"]["bank_fp32"]["features"][5], expected_row_5, atol=1e-6
        )


# Padded gather (rows_per_rank): the most rows a rank passes in _global_steps is 6.
ROWS_PER_RANK = 6
LONG_QUEUE_CAPACITY = 16  # >= the padded global batch (2 × 6): padding rows get their own slots


def _make_padded_memories(gather_distributed: bool = True) -> dict[str, FeatureMemory]:
    rows = ROWS_PER_RANK if gather_distributed else None
    return {
        "bank_fp32": MemoryBank(
            NUM_SAMPLES, DIM, momentum=0.5, gather_distributed=gather_distributed,
            rows_per_rank=rows,
        ),
        "bank_bf16_overwrite": MemoryBank(
            NUM_SAMPLES, DIM, momentum=0.0, dtype=torch.bfloat16,
            gather_distributed=gather_distributed, rows_per_rank=rows,
        ),
        # Shorter than the padded batch: drops the padding on the host (one read).
        "queue_short": MemoryQueue(
            QUEUE_CAPACITY, DIM, gather_distributed=gather_distributed, rows_per_rank=rows
        ),
        "queue_long": MemoryQueue(
            LONG_QUEUE_CAPACITY, DIM, gather_distributed=gather_distributed, rows_per_rank=rows
        ),
    }  # fmt: skip


def _padded_worker(rank: int, port: int, out_dir: str) -> None:
    import look.memory as memory_module

    init_gloo(rank, WORLD_SIZE, port, timeout_s=60)
    try:
        torch.set_num_threads(1)
        results: dict[str, object] = {}
        for policy in ("cpu", "accelerator"):
            if policy == "accelerator":  # the GPU's code path, on the CPU
                memory_module.host_reads_are_free = lambda device: False  # type: ignore[attr-defined]
            memories = _make_padded_memories()
            syncs = _feed_global_steps(memories, rank)
            states = {  # copies: the accelerator path goes on writing into the buffers
                name: {key: value.clone() for key, value in memory.state_dict().items()}
                for name, memory in memories.items()
            }
            # Refused at once on the CPU (nothing written), at the next check on an accelerator
            # (the other rows are written).
            errors = _nan_row_on_rank_1(memories, rank)
            # More rows than rows_per_rank is refused before any collective.
            try:
                memories["bank_fp32"].update(
                    torch.arange(7), torch.ones(7, DIM), torch.zeros(7, dtype=torch.int64)
                )
            except ValueError as error:
                errors["too_many_rows"] = str(error)
            results[policy] = {
                "read_free": {
                    name: memory.writes_without_host_reads for name, memory in memories.items()
                },
                "state": states,
                "errors": errors,
                "syncs": syncs,
            }
        torch.save(results, Path(out_dir) / f"padded_rank{rank}.pt")
        dist.barrier()  # (as in _worker)
    finally:
        dist.destroy_process_group()


def test_padded_gather_gives_the_same_memories_without_host_reads(tmp_path: Path) -> None:
    mp.spawn(_padded_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"padded_rank{rank}.pt") for rank in range(WORLD_SIZE)]

    for name, expected in _single_process_states(_make_padded_memories(False)).items():
        assert expected["valid"].any(), name
        for rank, result in enumerate(results):
            for policy in ("cpu", "accelerator"):
                state = result[policy]["state"][name]
                for key, value in expected.items():
                    assert torch.equal(state[key], value), (name, rank, policy, key)
                assert "feature rows" in result[policy]["errors"][name], (name, rank, policy)
                assert "more than rows_per_rank=6" in result[policy]["errors"]["too_many_rows"]
    # On the accelerator path the banks and the long queue never wait for the device; the
    # short queue drops its padding on the host once per update.
    for result in results:
        syncs = result["accelerator"]["syncs"]
        assert syncs["bank_fp32"] == syncs["bank_bf16_overwrite"] == syncs["queue_long"] == []
        assert syncs["queue_short"] == ["nonzero"] * len(_global_steps())
        # ...and the memories say so (LOOK defers only a write that reads nothing).
        read_free = result["accelerator"]["read_free"]
        assert read_free == {name: name != "queue_short" for name in read_free}
