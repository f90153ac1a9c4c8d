"""Single process: a ShardedMemoryBank is one shard, and must match the replicated MemoryBank and
look_loss_terms exactly (the gradient up to rounding). The multi-rank behaviour is in
test_sharded_ddp.py."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from look.losses import look_loss_terms
from look.memory import MemoryBank
from look.sharded import (
    ShardedMemoryBank,
    _merge_nearest,
    _merge_top_k,
    shard_bounds,
    sharded_look_loss_terms,
)

NUM_SAMPLES = 40
DIM = 6
NUM_CLASSES = 3
# The sharded loss's query gradient is Σ_j w_j · row_j summed per owner shard and then over
# shards, the replicated one's over the k neighbours in one go: the same terms in another order.
GRADIENT_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def _filled_pair(
    dtype: torch.dtype = torch.float32, momentum: float = 0.5, seed: int = 0
) -> tuple[MemoryBank, ShardedMemoryBank]:
    """A replicated and a sharded bank given the same updates: 30 of 40 rows written, some twice,
    with duplicate ids inside one batch."""
    generator = torch.Generator().manual_seed(seed)
    replicated = MemoryBank(NUM_SAMPLES, DIM, momentum=momentum, dtype=dtype)
    sharded = ShardedMemoryBank(NUM_SAMPLES, DIM, momentum=momentum, dtype=dtype)
    labels_of = torch.randint(0, NUM_CLASSES, (NUM_SAMPLES,), generator=generator)
    for ids in (torch.arange(0, 20), torch.tensor([3, 25, 3, 29, 10, 21, 22, 23, 24, 26, 27, 28])):
        features = torch.randn(len(ids), DIM, generator=generator)
        replicated.update(ids, features, labels_of[ids])
        sharded.update(ids, features, labels_of[ids])
    return replicated, sharded


def _queries(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(batch, DIM, generator=generator), dim=1)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    # Ids both inside the written rows (leave-one-out matters) and outside them.
    ids = torch.randperm(NUM_SAMPLES, generator=generator)[:batch]
    return query, labels, ids


def test_shard_bounds_cover_the_bank_in_near_equal_contiguous_blocks() -> None:
    for num_samples in (1, 7, 40, 41):
        for world_size in (1, 2, 3, 8):
            if num_samples < world_size:
                continue
            bounds = [shard_bounds(num_samples, world_size, r) for r in range(world_size)]
            sizes = [stop - start for start, stop in bounds]
            assert bounds[0][0] == 0 and bounds[-1][1] == num_samples
            assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world_size - 1))
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    ("args", "match"),
    [((10, 0, 0), "world_size"), ((10, 2, 2), "rank"), ((-1, 2, 0), "num_samples")],
)
def test_shard_bounds_rejects_bad_arguments(args: tuple[int, int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        shard_bounds(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("momentum", [0.5, 0.0])
def test_single_process_bank_equals_memory_bank(dtype: torch.dtype, momentum: float) -> None:
    replicated, sharded = _filled_pair(dtype, momentum)
    generator = torch.Generator().manual_seed(5)
    warm_ids = torch.tensor([30, 31, 30, 5])
    warm_features = torch.randn(4, DIM, generator=generator)
    replicated.fill_(warm_ids, warm_features, torch.tensor([0, 1, 2, 2]))
    sharded.fill_(warm_ids, warm_features, torch.tensor([0, 1, 2, 2]))

    assert (sharded.shard_start, sharded.shard_stop, sharded.size) == (0, NUM_SAMPLES, NUM_SAMPLES)
    for name in ("features", "labels", "ids", "valid"):
        assert torch.equal(getattr(sharded, name), getattr(replicated, name)), name
    assert torch.equal(sharded.shard_range, torch.tensor([0, NUM_SAMPLES, NUM_SAMPLES]))
    full = sharded.gather_full_state()
    assert all(torch.equal(full[name], replicated.state_dict()[name]) for name in full)


def test_update_validates_like_memory_bank_and_writes_nothing_on_error() -> None:
    _, sharded = _filled_pair()
    before = {name: buffer.clone() for name, buffer in sharded.state_dict().items()}
    bad_calls = [
        (torch.tensor([0, NUM_SAMPLES]), torch.randn(2, DIM), torch.tensor([0, 1]), "outside"),
        (torch.tensor([0, 1]), torch.full((2, DIM), float("nan")), torch.tensor([0, 1]), "NaN"),
        (torch.tensor([0, 1]), torch.randn(2, DIM), torch.tensor([0, -1]), "negative"),
        (torch.tensor([0, 1]), torch.randn(2, DIM + 1), torch.tensor([0, 1]), "shape"),
    ]
    for ids, features, labels, match in bad_calls:
        with pytest.raises(ValueError, match=match):
            sharded.update(ids, features, labels)
    for name, buffer in sharded.state_dict().items():
        assert torch.equal(buffer, before[name]), name


def test_checkpoint_of_another_shard_is_refused_and_full_state_round_trips() -> None:
    replicated, sharded = _filled_pair()
    state = sharded.state_dict()
    state["shard_range"] = torch.tensor([20, 40, NUM_SAMPLES])
    with pytest.raises(ValueError, match="gather_full_state"):
        ShardedMemoryBank(NUM_SAMPLES, DIM).load_state_dict(state)

    restored = ShardedMemoryBank(NUM_SAMPLES, DIM)
    restored.load_full_state_(replicated.state_dict())
    for name in ("features", "labels", "ids", "valid"):
        assert torch.equal(getattr(restored, name), getattr(replicated, name)), name
    with pytest.raises(ValueError, match="shape"):
        restored.load_full_state_({**replicated.state_dict(), "labels": torch.zeros(3)})

    reloaded = ShardedMemoryBank(NUM_SAMPLES, DIM)
    reloaded.load_state_dict(sharded.state_dict())
    assert torch.equal(reloaded.features, sharded.features)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("no_positive", ["drop", "nearest"])
@pytest.mark.parametrize(("k", "chunk_size"), [(1, 7), (5, 65536), (12, 4), (100, 9)])
def test_loss_terms_equal_replicated_look_loss_terms(
    dtype: torch.dtype, no_positive: str, k: int, chunk_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bitwise equality holds against the replicated path's row gather; for a small memory and a
    # large k that path takes a dense B × N product instead (equal within rounding, tested in
    # tests/losses), so it is switched off here.
    monkeypatch.setattr(importlib.import_module("look.losses.look_loss"), "_DENSE_LOGITS_LIMIT", 0)
    replicated, sharded = _filled_pair(dtype)
    query, labels, ids = _queries(16)
    expected_query = query.clone().requires_grad_(True)
    actual_query = query.clone().requires_grad_(True)

    expected = look_loss_terms(
        expected_query,
        labels,
        replicated.features,
        replicated.labels,
        k=k,
        temperature=0.1,
        query_indices=ids,
        memory_ids=replicated.ids,
        memory_valid=replicated.valid,
        no_positive=no_positive,  # type: ignore[arg-type]
        chunk_size=chunk_size,
    )
    actual = sharded_look_loss_terms(
        actual_query,
        labels,
        sharded,
        k=k,
        temperature=0.1,
        query_indices=ids,
        no_positive=no_positive,
        chunk_size=chunk_size,
    )
    # The set-up must exercise what is being compared: drops/swaps for k=1, valid queries.
    assert bool(expected.valid.any())
    if k == 1:
        assert not bool(expected.positive_in_topk.all())
    for field in expected._fields:
        torch.testing.assert_close(
            getattr(actual, field), getattr(expected, field), rtol=0, atol=0, msg=field
        )
    expected.loss.sum().backward()
    actual.loss.sum().backward()
    assert expected_query.grad is not None and actual_query.grad is not None
    if k > 1:  # with k=1 a kept query has p=1, so a zero gradient is right
        assert bool(expected_query.grad.abs().sum() > 0)
    torch.testing.assert_close(actual_query.grad, expected_query.grad, **GRADIENT_TOLERANCE)


def test_loss_without_query_indices_matches_replicated() -> None:
    replicated, sharded = _filled_pair()
    query, labels, _ = _queries(8)
    expected = look_loss_terms(
        query,
        labels,
        replicated.features,
        replicated.labels,
        k=4,
        temperature=0.2,
        memory_valid=replicated.valid,
    )
    actual = sharded_look_loss_terms(
        query, labels, sharded, k=4, temperature=0.2, query_indices=None
    )
    for field in expected._fields:
        torch.testing.assert_close(
            getattr(actual, field), getattr(expected, field), rtol=0, atol=0, msg=field
        )


def test_empty_bank_gives_zero_loss_with_graph() -> None:
    sharded = ShardedMemoryBank(NUM_SAMPLES, DIM)
    query, labels, ids = _queries(5)
    query.requires_grad_(True)
    terms = sharded_look_loss_terms(
        query, labels, sharded, k=3, temperature=0.1, query_indices=ids, no_positive="nearest"
    )
    assert not bool(terms.valid.any())
    assert torch.equal(terms.loss, torch.zeros(5))
    assert bool((terms.neighbour_indices == -1).all())
    terms.loss.sum().backward()
    assert query.grad is not None and bool(torch.isfinite(query.grad).all())


def test_loss_rejects_nca_wrong_memory_and_bad_queries() -> None:
    replicated, sharded = _filled_pair()
    query, labels, ids = _queries(4)
    with pytest.raises(ValueError, match="NCA"):
        sharded_look_loss_terms(query, labels, sharded, k=None, temperature=0.1, query_indices=ids)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ShardedMemoryBank"):
        sharded_look_loss_terms(query, labels, replicated, k=3, temperature=0.1, query_indices=ids)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        sharded_look_loss_terms(
            torch.full_like(query, float("nan")),
            labels,
            sharded,
            k=3,
            temperature=0.1,
            query_indices=ids,
        )
    with pytest.raises(ValueError, match="no_positive"):
        sharded_look_loss_terms(
            query, labels, sharded, k=3, temperature=0.1, query_indices=ids, no_positive="skip"
        )
    with pytest.raises(ValueError, match="feature dimension"):
        sharded_look_loss_terms(
            query[:, :3], labels, sharded, k=3, temperature=0.1, query_indices=ids
        )
    # Indices past the bank would exclude nothing (as look_loss_terms refuses them too).
    for wrong in (-5, sharded.num_samples):
        outside = ids.clone()
        outside[0] = wrong
        with pytest.raises(ValueError, match=r"query_indices lie in .* outside \[-1, "):
            sharded_look_loss_terms(
                query, labels, sharded, k=3, temperature=0.1, query_indices=outside
            )


def test_merge_breaks_ties_by_lower_id_whatever_the_order() -> None:
    inf = float("-inf")
    values = torch.tensor([[0.5, 0.75, inf, 0.5, 0.75, 0.25]])
    ids = torch.tensor([[7, 12, -1, 3, 4, 20]])
    labels = torch.tensor([[1, 2, -1, 3, 4, 5]])
    for order in (torch.arange(6), torch.tensor([5, 4, 3, 2, 1, 0])):
        positions = _merge_top_k(values[:, order], ids[:, order], 4)
        assert ids[:, order].gather(1, positions).tolist() == [[4, 12, 3, 7]]
        assert labels[:, order].gather(1, positions).tolist() == [[4, 2, 3, 1]]
        assert values[:, order].gather(1, positions).tolist() == [[0.75, 0.75, 0.5, 0.5]]
    padding_only = _merge_top_k(values[:, 2:3], ids[:, 2:3], 1)
    assert ids[:, 2:3].gather(1, padding_only).tolist() == [[-1]]
    nearest_shard = _merge_nearest(
        torch.tensor([[0.3, 0.7, 0.7], [inf, inf, inf]]), torch.tensor([[1, 9, 5], [-1, -1, -1]])
    )
    assert nearest_shard.tolist() == [2, -1]  # shard 2 holds id 5, the lower of the tied ids


def test_owners_products_in_chunks_of_queries_give_the_same_terms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The owners gather their candidates' rows a few queries at a time (a bounded temporary):
    # one query per chunk must give what one chunk for all gives.
    _, sharded = _filled_pair()
    query, labels, ids = _queries(9)
    results = []
    for limit in (1 << 24, 1):
        monkeypatch.setattr(importlib.import_module("look.sharded"), "_ROW_GATHER_LIMIT", limit)
        leaf = query.clone().requires_grad_(True)
        terms = sharded_look_loss_terms(
            leaf, labels, sharded, k=5, temperature=0.1, query_indices=ids, no_positive="nearest"
        )
        terms.loss.sum().backward()
        results.append((terms.loss, leaf.grad))
    (loss, grad), (chunked_loss, chunked_grad) = results
    assert bool(grad.abs().sum() > 0)
    assert torch.equal(chunked_loss, loss) and torch.equal(chunked_grad, grad)


def test_a_loaded_full_bank_is_searched_without_its_mask() -> None:
    # A resumed run: the loaded shard is checked at once, not after another epoch of writes.
    replicated, _ = _filled_pair()  # 30 of 40 rows written
    partial = ShardedMemoryBank(NUM_SAMPLES, DIM)
    partial.load_full_state_(replicated.state_dict())
    assert partial.search_valid() is partial.valid
    rest = torch.arange(NUM_SAMPLES)[~replicated.valid]
    replicated.update(rest, torch.randn(len(rest), DIM), torch.zeros_like(rest))
    full = ShardedMemoryBank(NUM_SAMPLES, DIM)
    full.load_full_state_(replicated.state_dict())
    assert full.search_valid() is None
    reloaded = ShardedMemoryBank(NUM_SAMPLES, DIM)
    reloaded.load_state_dict(full.state_dict())
    assert reloaded.search_valid() is None
