"""One rule for "two searches found the same neighbours", shared by the fused-search tests on CPU
(Triton's interpreter) and on CUDA."""

from __future__ import annotations

import torch

from look.search import KnnResult


def assert_same_neighbours(first: KnnResult, second: KnnResult, *, atol: float) -> None:
    """The same k values per query (within ``atol``), and the same neighbour rows except where
    rows tie with the k-th value: those may be swapped for each other, nothing else may."""
    assert first.values.shape == second.values.shape
    torch.testing.assert_close(first.values, second.values, rtol=0, atol=atol)
    for row in range(first.values.shape[0]):
        rows_first = dict(zip(first.indices[row].tolist(), first.values[row].tolist(), strict=True))
        rows_second = set(second.indices[row].tolist())
        kth_value = float(first.values[row].min())
        for index in set(rows_first) - rows_second:
            assert abs(rows_first[index] - kth_value) <= atol, (
                f"query {row}: row {index} (similarity {rows_first[index]}) is a neighbour of one "
                f"search only and does not tie with the k-th value {kth_value}"
            )
