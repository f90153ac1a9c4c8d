"""Tests for look.search.knn_search against a brute-force top-k over the full similarity matrix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from look.search import KnnResult, knn_search


def random_unit_rows(rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=1)


def brute_force(
    query: torch.Tensor,
    memory: torch.Tensor,
    k: int,
    *,
    query_ids: torch.Tensor | None = None,
    memory_ids: torch.Tensor | None = None,
    memory_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the whole masked ``B × N`` matrix, padded with -inf / -1."""
    similarities = query.double() @ memory.double().T
    excluded = torch.zeros_like(similarities, dtype=torch.bool)
    if memory_valid is not None:
        excluded |= ~memory_valid.unsqueeze(0)
    if query_ids is not None:
        ids = torch.arange(memory.shape[0]) if memory_ids is None else memory_ids
        excluded |= query_ids.unsqueeze(1) == ids.unsqueeze(0)
    similarities = similarities.masked_fill(excluded, float("-inf"))
    padded = torch.cat(
        [similarities, similarities.new_full((query.shape[0], k), float("-inf"))], dim=1
    )
    values, indices = padded.topk(k, dim=1)
    indices = indices.masked_fill(values == float("-inf"), -1)
    return values, indices


@pytest.fixture
def data() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    rows, batch, dim = 37, 9, 6
    memory = random_unit_rows(rows, dim, generator)
    query_ids = torch.randperm(rows, generator=generator)[:batch]
    # Each query is close to its own memory row, so leave-one-out changes the answer.
    query = F.normalize(
        memory[query_ids]
        + 0.05 * torch.randn(batch, dim, generator=generator, dtype=torch.float64),
        dim=1,
    )
    memory_valid = torch.rand(rows, generator=generator) > 0.25
    return {
        "query": query,
        "memory": memory,
        "query_ids": query_ids,
        "memory_valid": memory_valid,
        "query_labels": torch.randint(0, 4, (batch,), generator=generator),
        "memory_labels": torch.randint(0, 4, (rows,), generator=generator),
    }


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 36, 37, 65536])
@pytest.mark.parametrize("k", [1, 4, 37])
def test_matches_brute_force_with_exclusions(
    data: dict[str, torch.Tensor], chunk_size: int, k: int
) -> None:
    result = knn_search(
        data["query"].float(),
        data["memory"].float(),
        k,
        query_ids=data["query_ids"],
        memory_valid=data["memory_valid"],
        chunk_size=chunk_size,
    )
    expected_values, expected_indices = brute_force(
        data["query"],
        data["memory"],
        k,
        query_ids=data["query_ids"],
        memory_valid=data["memory_valid"],
    )
    assert result.values.dtype == torch.float32
    assert result.indices.dtype == torch.int64
    assert result.values.shape == result.indices.shape == (9, k)
    assert torch.equal(result.indices, expected_indices)
    torch.testing.assert_close(result.values.double(), expected_values, rtol=0, atol=1e-6)


def test_plain_search_without_ids_finds_self(data: dict[str, torch.Tensor]) -> None:
    result = knn_search(data["query"], data["memory"], 3, chunk_size=4)
    expected_values, expected_indices = brute_force(data["query"], data["memory"], 3)
    assert torch.equal(result.indices, expected_indices)
    assert torch.equal(result.indices[:, 0], data["query_ids"])
    torch.testing.assert_close(result.values, expected_values)
    assert result.nearest_positive_index is None
    assert result.nearest_positive_value is None


def test_fp64_inputs_are_searched_in_fp64(data: dict[str, torch.Tensor]) -> None:
    result = knn_search(data["query"], data["memory"], 2)
    assert result.values.dtype == torch.float64


def test_sorted_descending_and_padding(data: dict[str, torch.Tensor]) -> None:
    k = 40  # more than the 37 rows, many of which are invalid
    result = knn_search(
        data["query"],
        data["memory"],
        k,
        query_ids=data["query_ids"],
        memory_valid=data["memory_valid"],
        chunk_size=5,
    )
    real = result.indices >= 0
    # Every query's own row is valid or not; the number of candidates is exact.
    own_row_valid = data["memory_valid"][data["query_ids"]]
    expected_count = int(data["memory_valid"].sum()) - own_row_valid.long()
    assert torch.equal(real.sum(dim=1), expected_count)
    assert torch.isneginf(result.values[~real]).all()
    assert torch.isfinite(result.values[real]).all()
    assert (result.values[:, :-1] >= result.values[:, 1:]).all()
    # Padding only at the end.
    assert torch.equal(real, real.cummin(dim=1).values)


def test_invalid_rows_and_own_id_never_returned(data: dict[str, torch.Tensor]) -> None:
    result = knn_search(
        data["query"],
        data["memory"],
        37,
        query_ids=data["query_ids"],
        memory_valid=data["memory_valid"],
        chunk_size=3,
    )
    for row in range(result.indices.shape[0]):
        returned = result.indices[row][result.indices[row] >= 0]
        assert data["memory_valid"][returned].all()
        assert int(data["query_ids"][row]) not in returned.tolist()


def test_memory_ids_exclude_every_copy_of_the_query() -> None:
    # A queue can hold several past embeddings of the same sample; all of them are excluded.
    generator = torch.Generator().manual_seed(1)
    memory = random_unit_rows(20, 5, generator)
    memory_ids = torch.tensor(
        [3, 7, 3, 9, 3, 11, 12, 7, 14, 3, 16, 17, 18, 19, 20, 21, 7, 23, 3, 25]
    )
    query = memory[[0, 1]] + 0.01
    query_ids = torch.tensor([3, 7])
    result = knn_search(query, memory, 20, query_ids=query_ids, memory_ids=memory_ids, chunk_size=6)
    expected_values, expected_indices = brute_force(
        query, memory, 20, query_ids=query_ids, memory_ids=memory_ids
    )
    assert torch.equal(result.indices, expected_indices)
    assert (result.indices[0] >= 0).sum() == 15  # five copies of id 3 removed
    assert (result.indices[1] >= 0).sum() == 17  # three copies of id 7 removed
    torch.testing.assert_close(result.values, expected_values)


@pytest.mark.parametrize("chunk_size", [1, 4, 37])
def test_nearest_positive_over_whole_memory(data: dict[str, torch.Tensor], chunk_size: int) -> None:
    query_labels = data["query_labels"].clone()
    query_labels[0] = 99  # a label the memory does not have
    result = knn_search(
        data["query"],
        data["memory"],
        2,
        query_ids=data["query_ids"],
        memory_valid=data["memory_valid"],
        chunk_size=chunk_size,
        query_labels=query_labels,
        memory_labels=data["memory_labels"],
    )
    assert isinstance(result, KnnResult)
    assert result.nearest_positive_value is not None
    assert result.nearest_positive_index is not None
    similarities = data["query"] @ data["memory"].T
    for row in range(query_labels.shape[0]):
        candidates = [
            j
            for j in range(37)
            if bool(data["memory_valid"][j])
            and j != int(data["query_ids"][row])
            and int(data["memory_labels"][j]) == int(query_labels[row])
        ]
        if not candidates:
            assert int(result.nearest_positive_index[row]) == -1
            assert float(result.nearest_positive_value[row]) == float("-inf")
            continue
        best = max(candidates, key=lambda j: float(similarities[row, j]))
        assert int(result.nearest_positive_index[row]) == best
        assert float(result.nearest_positive_value[row]) == pytest.approx(
            float(similarities[row, best]), abs=1e-12
        )
    assert int(result.nearest_positive_index[0]) == -1


@pytest.mark.parametrize("memory_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_memory_is_upcast_per_chunk(
    data: dict[str, torch.Tensor], memory_dtype: torch.dtype
) -> None:
    # The query is rounded to the memory's dtype (as the fused GPU search does), then both are
    # multiplied in fp32.
    low = data["memory"].to(memory_dtype)
    result = knn_search(data["query"].float(), low, 5, query_ids=data["query_ids"], chunk_size=6)
    assert result.values.dtype == torch.float32
    expected_values, expected_indices = brute_force(
        data["query"].to(memory_dtype), low, 5, query_ids=data["query_ids"]
    )
    assert torch.equal(result.indices, expected_indices)
    torch.testing.assert_close(result.values.double(), expected_values, rtol=0, atol=1e-6)


def test_no_gradient_is_tracked(data: dict[str, torch.Tensor]) -> None:
    query = data["query"].clone().requires_grad_(True)
    memory = data["memory"].clone().requires_grad_(True)
    result = knn_search(query, memory, 3)
    assert not result.values.requires_grad
    assert result.values.grad_fn is None


def test_all_rows_invalid_and_empty_memory() -> None:
    query = torch.randn(3, 4)
    result = knn_search(query, torch.randn(5, 4), 2, memory_valid=torch.zeros(5, dtype=torch.bool))
    assert torch.isneginf(result.values).all()
    assert (result.indices == -1).all()
    empty = knn_search(query, torch.empty(0, 4), 2)
    assert empty.values.shape == (3, 2)
    assert (empty.indices == -1).all()


def test_non_finite_queries_and_candidate_rows_are_refused_on_the_cpu() -> None:
    query, memory = torch.randn(3, 4), torch.randn(6, 4)
    bad_query = query.clone()
    bad_query[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"query holds NaN or Inf in 1 row.*first row 1"):
        knn_search(bad_query, memory, 2)
    bad_memory = memory.clone()
    bad_memory[4] = float("inf")
    with pytest.raises(ValueError, match=r"memory holds NaN or Inf .*first row 4"):
        knn_search(query, bad_memory, 2)
    # A row the valid mask leaves out (an unwritten one) may hold anything.
    valid = torch.ones(6, dtype=torch.bool)
    valid[4] = False
    result = knn_search(query, bad_memory, 2, memory_valid=valid)
    assert not (result.indices == 4).any() and torch.isfinite(result.values).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be >= 1"),
        ({"k": 2.5}, "k must be a positive integer"),
        ({"k": True}, "k must be a positive integer"),
        ({"chunk_size": 0}, "chunk_size must be >= 1"),
        ({"memory": torch.randn(6, 3)}, "same feature dimension"),
        ({"query": torch.randn(4)}, "query must be 2-D"),
        ({"memory": torch.randn(2, 6, 4)}, "memory must be 2-D"),
        ({"query": torch.ones(2, 4, dtype=torch.int64)}, "floating-point"),
        ({"query_ids": torch.arange(3)}, r"query_ids must have shape \(2,\)"),
        ({"memory_valid": torch.ones(6)}, "memory_valid must be a bool tensor"),
        ({"memory_valid": torch.ones(5, dtype=torch.bool)}, r"memory_valid must have shape \(6,\)"),
        ({"memory_ids": torch.arange(6)}, "memory_ids was given without query_ids"),
        ({"query_labels": torch.zeros(2, dtype=torch.int64)}, "given together"),
        (
            {
                "query_labels": torch.zeros(2, dtype=torch.int64),
                "memory_labels": torch.zeros(6),
            },
            "memory_labels must be an integer tensor",
        ),
    ],
)
def test_validation_errors(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"query": torch.randn(2, 4), "memory": torch.randn(6, 4), "k": 2}
    arguments.update(kwargs)
    query, memory, k = arguments.pop("query"), arguments.pop("memory"), arguments.pop("k")
    with pytest.raises(ValueError, match=message):
        knn_search(query, memory, k, **arguments)  # type: ignore[arg-type]


def test_exclude_own_rows_touches_only_each_querys_own_column_inside_the_chunk() -> None:
    from look.search import exclude_own_rows_

    similarities = torch.arange(12.0).view(3, 4)
    # Chunk of memory rows 10..13: query 0's row 11 is inside, query 1's row 3 and query 2's
    # id -1 (no id) are not.
    exclude_own_rows_(similarities, torch.tensor([11, 3, -1]), first_row=10)
    expected = torch.arange(12.0).view(3, 4)
    expected[0, 1] = float("-inf")
    assert torch.equal(similarities, expected)
