"""Single-process tests of look.memory: update rules, validation, FIFO order, checkpoints."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from look.memory import FeatureMemory, MemoryBank, MemoryQueue, build_memory

DIM = 4


def _unit_rows(rows: int, dim: int = DIM, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=generator), dim=1)


def _snapshot(memory: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in memory.state_dict().items()}


def _assert_same_state(memory: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    state = memory.state_dict()
    assert state.keys() == snapshot.keys()
    for key, value in snapshot.items():
        assert torch.equal(state[key], value), key


# ---------------------------------------------------------------- bank: update rule


def test_bank_starts_empty() -> None:
    bank = MemoryBank(6, DIM)
    assert bank.size == 6 and bank.dim == DIM
    assert bank.num_valid() == 0
    assert torch.equal(bank.ids, torch.full((6,), -1))
    assert torch.equal(bank.labels, torch.full((6,), -1))
    assert not bank.valid.any()
    assert bank.features.dtype == torch.float32 and not bank.features.any()


def test_bank_first_write_stores_normalised_features() -> None:
    bank = MemoryBank(6, DIM, momentum=0.5)
    raw = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    bank.update(torch.tensor([4, 1]), raw, torch.tensor([7, 2]))

    # A first write is z itself, not 0.5 * 0 + 0.5 * z.
    assert torch.allclose(bank.features[4], torch.tensor([0.6, 0.8, 0.0, 0.0]))
    assert torch.allclose(bank.features[1], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert bank.labels.tolist() == [-1, 2, -1, -1, 7, -1]
    assert bank.ids.tolist() == [-1, 1, -1, -1, 4, -1]
    assert bank.valid.tolist() == [False, True, False, False, True, False]
    assert bank.num_valid() == 2
    assert not bank.features[[0, 2, 3, 5]].any()


def test_bank_momentum_update_mixes_and_renormalises() -> None:
    momentum = 0.7
    bank = MemoryBank(5, DIM, momentum=momentum)
    first = _unit_rows(3, seed=1)
    second = _unit_rows(3, seed=2)
    bank.update(torch.tensor([0, 2, 3]), first, torch.tensor([1, 1, 0]))
    # Row 4 is new in this batch: it must be a plain write while the others mix.
    bank.update(torch.tensor([2, 3, 4]), second, torch.tensor([1, 0, 5]))

    expected_2 = F.normalize(momentum * first[1] + (1 - momentum) * second[0], dim=0)
    expected_3 = F.normalize(momentum * first[2] + (1 - momentum) * second[1], dim=0)
    assert torch.allclose(bank.features[0], first[0])
    assert torch.allclose(bank.features[2], expected_2, atol=1e-6)
    assert torch.allclose(bank.features[3], expected_3, atol=1e-6)
    assert torch.allclose(bank.features[4], second[2])
    written = bank.features[bank.valid]
    assert torch.allclose(written.norm(dim=1), torch.ones(4), atol=1e-6)
    assert bank.labels.tolist() == [1, -1, 1, 0, 5]


def test_bank_zero_momentum_overwrites_exactly() -> None:
    bank = MemoryBank(3, DIM, momentum=0.0)
    bank.update(torch.tensor([0, 1]), _unit_rows(2, seed=1), torch.tensor([0, 1]))
    replacement = _unit_rows(2, seed=2)
    bank.update(torch.tensor([1, 0]), replacement, torch.tensor([1, 0]))
    assert torch.allclose(bank.features[1], replacement[0], atol=1e-7)
    assert torch.allclose(bank.features[0], replacement[1], atol=1e-7)


def test_bank_opposite_mix_falls_back_to_new_feature() -> None:
    # z = -m at momentum 0.5 mixes to the zero vector; the row must not become zero.
    bank = MemoryBank(1, DIM, momentum=0.5)
    row = _unit_rows(1)
    bank.update(torch.tensor([0]), row, torch.tensor([0]))
    bank.update(torch.tensor([0]), -row, torch.tensor([0]))
    assert torch.allclose(bank.features[0], -row[0])


def test_bank_detaches_features_that_require_grad() -> None:
    bank = MemoryBank(3, DIM)
    features = torch.randn(2, DIM, requires_grad=True)
    bank.update(torch.tensor([0, 1]), features * 2.0, torch.tensor([0, 1]))
    assert not bank.features.requires_grad
    assert bank.features.grad_fn is None
    assert features.grad is None


def test_bank_accepts_any_integer_and_float_dtypes() -> None:
    bank = MemoryBank(4, DIM)
    features = _unit_rows(2).to(torch.float16)
    bank.update(
        torch.tensor([1, 3], dtype=torch.int32), features, torch.tensor([5, 6], dtype=torch.int16)
    )
    assert bank.ids.dtype == torch.int64 and bank.labels.dtype == torch.int64
    assert bank.labels.tolist() == [-1, 5, -1, 6]
    assert torch.allclose(bank.features[[1, 3]], F.normalize(features.float(), dim=1))


@pytest.mark.parametrize("update", ["update", "fill_"])
def test_bank_duplicate_ids_last_occurrence_wins(update: str) -> None:
    bank = MemoryBank(4, DIM, momentum=0.5)
    features = _unit_rows(4, seed=3)
    getattr(bank, update)(torch.tensor([2, 0, 2, 2]), features, torch.tensor([1, 0, 2, 3]))
    assert torch.allclose(bank.features[2], features[3])
    assert bank.labels[2].item() == 3
    assert torch.allclose(bank.features[0], features[1])

    # With a previous value, the mix is applied once, with the last duplicate.
    previous = bank.features[2].clone()
    more = _unit_rows(2, seed=4)
    bank.update(torch.tensor([2, 2]), more, torch.tensor([9, 8]))
    expected = F.normalize(0.5 * previous + 0.5 * more[1], dim=0)
    assert torch.allclose(bank.features[2], expected, atol=1e-6)
    assert bank.labels[2].item() == 8


def test_bank_fill_writes_without_momentum() -> None:
    bank = MemoryBank(3, DIM, momentum=0.9)
    bank.update(torch.tensor([0, 1]), _unit_rows(2, seed=1), torch.tensor([0, 1]))
    warm = _unit_rows(3, seed=2)
    bank.fill_(torch.tensor([0, 1, 2]), warm * 3.0, torch.tensor([4, 5, 6]))
    assert torch.allclose(bank.features, warm, atol=1e-6)
    assert bank.labels.tolist() == [4, 5, 6]
    assert bank.valid.all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bf16", "float16"])
def test_bank_low_precision_storage(dtype: torch.dtype | str) -> None:
    bank = MemoryBank(3, DIM, momentum=0.5, dtype=dtype)
    assert bank.features.dtype in (torch.bfloat16, torch.float16)
    assert bank.storage_dtype == bank.features.dtype
    first = _unit_rows(2, seed=1)
    second = _unit_rows(2, seed=2)
    bank.update(torch.tensor([0, 1]), first, torch.tensor([0, 1]))
    assert torch.equal(bank.features[:2], first.to(bank.features.dtype))

    stored = bank.features[0].float()
    bank.update(torch.tensor([0]), second[:1], torch.tensor([0]))
    # The mix reads the stored (rounded) row, computes in fp32, and rounds once on storage.
    expected = F.normalize(0.5 * stored + 0.5 * second[0], dim=0).to(bank.features.dtype)
    assert torch.equal(bank.features[0], expected)
    assert torch.allclose(bank.features[0].float().norm(), torch.tensor(1.0), atol=1e-2)


# ---------------------------------------------------------------- leave-one-out ids


def test_ids_support_leave_one_out_masks() -> None:
    bank = MemoryBank(5, DIM)
    bank.update(torch.tensor([3, 0, 4]), _unit_rows(3), torch.tensor([1, 1, 2]))
    query_ids = torch.tensor([3, 1])
    candidates = bank.valid[None, :] & (bank.ids[None, :] != query_ids[:, None])
    # Query 3 sees rows 0 and 4 (not its own row, not unwritten rows); query 1 (not in the
    # bank) sees all written rows.
    assert candidates.tolist() == [
        [True, False, False, False, True],
        [True, False, False, True, True],
    ]

    queue = MemoryQueue(4, DIM)
    queue.update(torch.tensor([7, 2, 7]), _unit_rows(3), torch.tensor([0, 1, 0]))
    candidates = queue.valid & (queue.ids != 7)
    # Every entry holding sample 7 is left out, and the unwritten slot too.
    assert candidates.tolist() == [False, True, False, False]


# ---------------------------------------------------------------- queue


def test_queue_fifo_order_and_wrap_around() -> None:
    queue = MemoryQueue(5, DIM)
    first = _unit_rows(3, seed=1)
    queue.update(torch.tensor([10, 11, 12]), first, torch.tensor([0, 1, 2]))
    assert queue.ids.tolist() == [10, 11, 12, -1, -1]
    assert queue.valid.tolist() == [True, True, True, False, False]
    assert queue.ptr.item() == 3

    second = _unit_rows(3, seed=2)
    queue.update(torch.tensor([13, 14, 15]), second, torch.tensor([3, 4, 5]))
    # 13, 14 fill the end, 15 wraps over the oldest entry (10).
    assert queue.ids.tolist() == [15, 11, 12, 13, 14]
    assert queue.labels.tolist() == [5, 1, 2, 3, 4]
    assert queue.ptr.item() == 1
    assert torch.allclose(queue.features[0], second[2])
    assert torch.allclose(queue.features[3], second[0])
    assert torch.allclose(queue.features[1], first[1])
    assert queue.num_valid() == 5


def _reference_queue_ids(capacity: int, batches: list[list[int]]) -> tuple[list[int], int]:
    """Enqueue one id at a time: the specification that batched writes must match."""
    slots = [-1] * capacity
    pointer = 0
    for batch in batches:
        for sample_id in batch:
            slots[pointer] = sample_id
            pointer = (pointer + 1) % capacity
    return slots, pointer


@pytest.mark.parametrize(
    "batch_sizes",
    [[9], [2, 9], [3, 4, 11, 1], [4, 4, 4], [0, 5, 0, 2]],
)
def test_queue_matches_one_at_a_time_enqueue(batch_sizes: list[int]) -> None:
    capacity = 4
    queue = MemoryQueue(capacity, DIM)
    batches: list[list[int]] = []
    next_id = 0
    for step, batch_size in enumerate(batch_sizes):
        ids = list(range(next_id, next_id + batch_size))
        next_id += batch_size
        batches.append(ids)
        features = _unit_rows(batch_size, seed=step) if batch_size else torch.zeros(0, DIM)
        ids_tensor = torch.tensor(ids, dtype=torch.int64)
        queue.update(ids_tensor, features, ids_tensor % 3)
    expected_ids, expected_pointer = _reference_queue_ids(capacity, batches)
    assert queue.ids.tolist() == expected_ids
    assert queue.ptr.item() == expected_pointer
    assert queue.valid.tolist() == [sample_id >= 0 for sample_id in expected_ids]
    written = queue.ids >= 0
    assert queue.labels[written].tolist() == [i % 3 for i in queue.ids[written].tolist()]


def test_queue_batch_larger_than_capacity_keeps_newest_features() -> None:
    queue = MemoryQueue(3, DIM)
    queue.update(torch.tensor([0]), _unit_rows(1, seed=0), torch.tensor([0]))
    batch = _unit_rows(7, seed=1)
    queue.update(torch.arange(1, 8), batch, torch.zeros(7, dtype=torch.int64))
    # 8 rows written one by one from slot 0 end with ids 6, 7 in slots 0, 1 and 5 in slot 2.
    assert queue.ids.tolist() == [6, 7, 5]
    assert torch.allclose(queue.features[0], batch[5])
    assert torch.allclose(queue.features[1], batch[6])
    assert torch.allclose(queue.features[2], batch[4])
    assert queue.ptr.item() == 2


def test_a_queue_shorter_than_the_rows_written_at_once_warns() -> None:
    # The method knows the per-rank batch: a queue shorter than it keeps part of every batch.
    with pytest.warns(RuntimeWarning, match="queue of 3 entries is shorter than the 4 rows"):
        MemoryQueue(3, DIM, rows_per_rank=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MemoryQueue(4, DIM, rows_per_rank=4)
        MemoryQueue(3, DIM)  # (no batch size known)


def test_queue_reset_rewinds_pointer() -> None:
    queue = MemoryQueue(3, DIM)
    queue.update(torch.tensor([1, 2]), _unit_rows(2), torch.tensor([0, 1]))
    queue.reset()
    assert queue.ptr.item() == 0
    assert queue.num_valid() == 0
    assert queue.ids.tolist() == [-1, -1, -1]
    assert not queue.features.any()


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("memory_kind", ["bank", "queue"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), 0.0])
def test_bad_feature_rows_are_rejected_and_memory_untouched(
    memory_kind: str, bad_value: float
) -> None:
    memory = build_memory(memory_kind, num_samples=6, dim=DIM, queue_size=6)
    memory.update(torch.tensor([0, 1]), _unit_rows(2), torch.tensor([0, 1]))
    before = _snapshot(memory)
    features = _unit_rows(4, seed=5)
    if bad_value == 0.0:  # zero-norm rows cannot be normalised
        features[1] = 0.0
        features[3] = 0.0
    else:
        features[1, 0] = bad_value
        features[3, 2] = bad_value
    with pytest.raises(ValueError, match=r"2 of 4 feature rows"):
        memory.update(torch.tensor([0, 2, 3, 4]), features, torch.tensor([0, 1, 2, 3]))
    _assert_same_state(memory, before)


def test_row_whose_norm_overflows_is_rejected() -> None:
    bank = MemoryBank(2, DIM)
    huge = torch.full((1, DIM), 3e38)  # finite entries, but the fp32 norm is inf
    with pytest.raises(ValueError, match="1 of 1 feature rows"):
        bank.update(torch.tensor([0]), huge, torch.tensor([0]))
    assert bank.num_valid() == 0


def test_bank_rejects_ids_out_of_range() -> None:
    bank = MemoryBank(5, DIM)
    before = _snapshot(bank)
    with pytest.raises(ValueError, match=r"2 ids are outside \[0, 5\).*\[5, -1\]"):
        bank.update(torch.tensor([0, 5, -1]), _unit_rows(3), torch.tensor([0, 0, 0]))
    _assert_same_state(bank, before)


def test_queue_rejects_negative_ids_and_labels() -> None:
    queue = MemoryQueue(5, DIM)
    before = _snapshot(queue)
    with pytest.raises(ValueError, match="outside"):
        queue.update(torch.tensor([-2]), _unit_rows(1), torch.tensor([0]))
    with pytest.raises(ValueError, match="labels are negative"):
        queue.update(torch.tensor([100]), _unit_rows(1), torch.tensor([-1]))
    _assert_same_state(queue, before)


@pytest.mark.parametrize(
    ("ids", "features", "labels", "message"),
    [
        (torch.tensor([0, 1]), torch.randn(2, DIM + 1), torch.tensor([0, 1]), r"shape \(B, 4\)"),
        (torch.tensor([0, 1]), torch.randn(2), torch.tensor([0, 1]), r"shape \(B, 4\)"),
        (
            torch.tensor([0]),
            torch.randn(2, DIM),
            torch.tensor([0, 1]),
            r"ids must have shape \(2,\)",
        ),
        (
            torch.tensor([0, 1]),
            torch.randn(2, DIM),
            torch.tensor([[0, 1]]),
            "labels must have shape",
        ),
        (
            torch.tensor([0.0, 1.0]),
            torch.randn(2, DIM),
            torch.tensor([0, 1]),
            "ids must be an integer",
        ),
        (
            torch.tensor([0, 1]),
            torch.randn(2, DIM),
            torch.tensor([True, False]),
            "labels must be an integer",
        ),
        (
            torch.tensor([0, 1]),
            torch.ones(2, DIM, dtype=torch.int64),
            torch.tensor([0, 1]),
            "floating",
        ),
        ([0, 1], torch.randn(2, DIM), torch.tensor([0, 1]), "torch.Tensor"),
    ],
)
def test_update_rejects_malformed_input(
    ids: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, message: str
) -> None:
    bank = MemoryBank(4, DIM)
    with pytest.raises(ValueError, match=message):
        bank.update(ids, features, labels)
    assert bank.num_valid() == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 0, "dim": DIM}, "size must be a positive int"),
        ({"size": 3, "dim": 0}, "dim must be a positive int"),
        ({"size": 3, "dim": DIM, "momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"size": 3, "dim": DIM, "momentum": -0.1}, r"momentum must be in \[0, 1\)"),
        ({"size": 3, "dim": DIM, "dtype": torch.float64}, "memory dtype must be"),
        ({"size": 3, "dim": DIM, "dtype": "int8"}, "unknown memory dtype"),
    ],
)
def test_bank_constructor_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MemoryBank(**kwargs)


def test_sizes_may_be_any_integer_type_but_not_a_float_or_bool() -> None:
    import numpy as np

    bank = MemoryBank(np.int64(10), np.int32(DIM))
    assert bank.features.shape == (10, DIM) and type(bank.features.shape[0]) is int
    for size in (10.0, True):
        with pytest.raises(ValueError, match="size must be a positive int"):
            MemoryBank(size, DIM)


# ---------------------------------------------------------------- factory, repr, bytes


def test_build_memory() -> None:
    bank = build_memory("bank", num_samples=10, dim=DIM, momentum=0.2, dtype="bf16")
    assert isinstance(bank, MemoryBank) and isinstance(bank, FeatureMemory)
    assert bank.size == 10 and bank.momentum == 0.2 and bank.features.dtype == torch.bfloat16
    queue = build_memory("queue", num_samples=10, dim=DIM, queue_size=7, dtype=torch.float16)
    assert isinstance(queue, MemoryQueue)
    assert queue.capacity == 7 and queue.features.dtype == torch.float16
    with pytest.raises(ValueError, match="unknown memory kind 'heap'"):
        build_memory("heap", num_samples=10, dim=DIM, queue_size=7)
    with pytest.raises(ValueError, match="num_samples"):
        build_memory("bank", dim=DIM)
    with pytest.raises(ValueError, match="queue_size"):
        build_memory("queue", num_samples=10, dim=DIM)


def test_memory_bytes_and_repr() -> None:
    bank = MemoryBank(100, 8, dtype=torch.bfloat16)
    assert bank.memory_bytes() == 100 * 8 * 2 + 100 * 8 + 100 * 8 + 100
    assert "size=100, dim=8, dtype=bfloat16" in repr(bank)
    assert "momentum=0.5" in repr(bank)
    queue = MemoryQueue(10, 8)
    assert queue.memory_bytes() == 10 * 8 * 4 + 10 * 8 + 10 * 8 + 10 + 8
    assert "ptr=0" in repr(queue)


def test_bank_reset() -> None:
    bank = MemoryBank(3, DIM)
    bank.update(torch.tensor([0, 2]), _unit_rows(2), torch.tensor([1, 1]))
    bank.reset()
    assert bank.num_valid() == 0 and not bank.features.any()
    assert bank.ids.tolist() == [-1, -1, -1] and bank.labels.tolist() == [-1, -1, -1]


# ---------------------------------------------------------------- checkpoints


class _Owner(nn.Module):
    """Stands in for a method that owns a memory (so keys carry a prefix)."""

    def __init__(self, memory: FeatureMemory) -> None:
        super().__init__()
        self.head = nn.Linear(2, 2)
        self.memory = memory


@pytest.mark.parametrize("kind", ["bank", "queue"])
def test_state_dict_round_trip_restores_everything(kind: str) -> None:
    def make() -> FeatureMemory:
        return build_memory(kind, num_samples=8, dim=DIM, queue_size=5, dtype=torch.bfloat16)

    original = _Owner(make())
    for step in range(3):
        ids = torch.tensor([step, step + 3])
        original.memory.update(ids, _unit_rows(2, seed=step), ids % 2)
    state = original.state_dict()
    expected_keys = {"features", "labels", "ids", "valid"} | ({"ptr"} if kind == "queue" else set())
    assert {
        key.removeprefix("memory.") for key in state if key.startswith("memory.")
    } == expected_keys

    restored = _Owner(make())
    restored.load_state_dict(state)
    _assert_same_state(restored, original.state_dict())

    # Both continue identically after the restore.
    for owner in (original, restored):
        owner.memory.update(torch.tensor([1, 6]), _unit_rows(2, seed=9), torch.tensor([0, 1]))
    _assert_same_state(restored, original.state_dict())


def test_load_rejects_changed_dataset_size() -> None:
    saved = _Owner(MemoryBank(8, DIM)).state_dict()
    with pytest.raises(ValueError, match=r"memory\.features.*\(8, 4\).*\(9, 4\).*dataset size"):
        _Owner(MemoryBank(9, DIM)).load_state_dict(saved)


def test_load_rejects_changed_dim_and_capacity() -> None:
    with pytest.raises(ValueError, match=r"\(5, 4\).*\(5, 6\)"):
        MemoryQueue(5, 6).load_state_dict(MemoryQueue(5, DIM).state_dict())
    with pytest.raises(ValueError, match="queue capacity"):
        MemoryQueue(6, DIM).load_state_dict(MemoryQueue(5, DIM).state_dict())


def test_load_rejects_corrupt_queue_pointer() -> None:
    state = MemoryQueue(5, DIM).state_dict()
    state["ptr"] = torch.tensor(7)
    with pytest.raises(ValueError, match="pointer 7"):
        MemoryQueue(5, DIM).load_state_dict(state)


# ---------------------------------------------------------------- search_valid: a full memory


def _fill_in_updates(memory: FeatureMemory, rows: int, per_update: int, seed: int = 0) -> None:
    ids = torch.arange(rows)
    features = _unit_rows(rows, seed=seed)
    for start in range(0, rows, per_update):
        part = slice(start, start + per_update)
        memory.update(ids[part] % memory.size, features[part], torch.zeros_like(ids[part]))


@pytest.mark.parametrize("kind", ["bank", "queue", "bank_fill"])
def test_a_full_memory_is_searched_without_its_mask(kind: str) -> None:
    memory: FeatureMemory = MemoryQueue(12, DIM) if kind == "queue" else MemoryBank(12, DIM)
    assert memory.search_valid() is memory.valid
    if kind == "bank_fill":  # warm-up writes count too
        for start in range(0, 12, 2):
            ids = torch.arange(start, start + 2)
            memory.fill_(ids, _unit_rows(2, seed=start), torch.zeros_like(ids))  # type: ignore[attr-defined]
    else:
        _fill_in_updates(memory, 12, per_update=2)  # 6 updates: full, but not checked yet
    assert memory.valid.all() and memory.search_valid() is memory.valid
    _fill_in_updates(memory, 4, per_update=2)  # the 8th update checks
    assert memory.search_valid() is None
    _fill_in_updates(memory, 6, per_update=3, seed=1)  # its own writes keep it full
    assert memory.search_valid() is None


def test_a_memory_not_full_keeps_its_mask() -> None:
    bank = MemoryBank(12, DIM)
    # Twice as many rows as the bank holds in 12 updates (4 checks), but row 11 never written.
    for update in range(12):
        ids = torch.arange(2 * update, 2 * update + 2) % 11
        bank.update(ids, _unit_rows(2, seed=update), torch.zeros_like(ids))
    assert not bank.valid[11] and bank.search_valid() is bank.valid


@pytest.mark.parametrize("change", ["user", "reset", "load", "data_ptr"])
def test_a_full_memory_forgets_it_when_valid_changes_otherwise(change: str) -> None:
    bank = MemoryBank(8, DIM)
    _fill_in_updates(bank, 16, per_update=2)
    assert bank.search_valid() is None
    if change == "user":
        bank.valid[3] = False
    elif change == "reset":
        bank.reset()
    elif change == "load":
        half_written = MemoryBank(8, DIM)
        half_written.update(torch.arange(4), _unit_rows(4), torch.zeros(4, dtype=torch.long))
        bank.load_state_dict(half_written.state_dict())
    else:  # a new tensor (as after .to(device)), whatever its version
        bank.valid = bank.valid.clone()
    assert bank.search_valid() is bank.valid
    # ...and it writes on without claiming to be full until a new check says so.
    bank.update(torch.arange(2), _unit_rows(2), torch.zeros(2, dtype=torch.long))
    assert bank.search_valid() is bank.valid


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_full_cuda_memory_learns_it_without_waiting() -> None:
    bank = MemoryBank(64, DIM).cuda()
    ids = torch.arange(64, device="cuda")
    for start in range(0, 64, 8):  # 8 updates: the last one queues the check
        part = ids[start : start + 8]
        bank.update(part, _unit_rows(8, seed=start).cuda(), torch.zeros_like(part))
    torch.cuda.synchronize()
    assert bank.search_valid() is None


def _assert_copy_of(memory: FeatureMemory) -> None:
    from look.search_triton import QuantizedRows

    copy = memory.search_prefilter()
    assert copy is not None
    whole = QuantizedRows.from_memory(memory.features)
    assert torch.equal(copy.values, whole.values)
    assert torch.equal(copy.scales, whole.scales) and torch.equal(copy.errors, whole.errors)
    assert float(copy.norm_bound) >= float(whole.norm_bound)


def test_an_int8_copy_follows_every_kind_of_change_to_the_bank() -> None:
    bank = MemoryBank(50, 8, momentum=0.5, dtype="bf16", int8_prefilter=True)
    _assert_copy_of(bank)  # built on first use (all zero rows)
    copy = bank.search_prefilter()
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):  # momentum writes with repeated ids update the copy in place
        ids = torch.randint(0, 50, (30,), generator=generator)
        bank.update(ids, torch.randn(30, 8, generator=generator), torch.zeros(30, dtype=torch.long))
        assert bank.search_prefilter() is copy
        _assert_copy_of(bank)
    bank.fill_(torch.arange(5), torch.randn(5, 8, generator=generator), torch.zeros(5).long())
    assert bank.search_prefilter() is copy
    _assert_copy_of(bank)
    # Changes the bank did not make itself: the copy is rebuilt when next asked for.
    with torch.no_grad():
        bank.features[7] = 3.0
    _assert_copy_of(bank)
    state = {key: value.clone() for key, value in bank.state_dict().items()}
    assert not any("int8" in key or "quantized" in key for key in state)  # derived, never saved
    bank.reset()
    _assert_copy_of(bank)
    bank.load_state_dict(state)
    _assert_copy_of(bank)
    before = bank.memory_bytes()
    assert bank.search_prefilter() is not None
    assert bank.memory_bytes() == before  # counted once built: 8 int8 + 2 fp32 per row
    plain = MemoryBank(50, 8, dtype="bf16")
    assert bank.memory_bytes() - plain.memory_bytes() == 50 * (8 + 4 + 4)


def test_an_int8_copy_needs_a_half_precision_bank() -> None:
    assert MemoryBank(10, 4, int8_prefilter=True).search_prefilter() is None  # fp32 rows
    assert MemoryBank(10, 4, dtype="bf16").search_prefilter() is None  # not asked for
    with pytest.raises(ValueError, match="a queue is searched by id"):
        build_memory("queue", dim=4, queue_size=16, dtype="bf16", int8_prefilter=True)
