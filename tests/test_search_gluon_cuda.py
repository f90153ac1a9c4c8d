"""The Gluon passes on a Hopper GPU (skipped elsewhere): the same neighbours as the PyTorch scan
and the Triton passes, with the Gluon kernels themselves having run (not the Triton passes they
fall back to).

Its own file so that ``benchmarks/gpu_session.sh`` runs it under its own time limit: a kernel
whose barriers deadlock would hang here, not in the other CUDA tests."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import look.search_triton as search_triton
from look import search_gluon
from look.search import KnnResult, knn_search
from look.search_gluon import (
    gluon_available,
    gluon_bound_columns,
    gluon_bound_pass,
    gluon_collect_pass,
)
from look.search_triton import KERNEL_CONFIGS, SearchKernelConfig, _cdiv, fused_knn_search
from tests.gluon_reference import collect_bound, pass_similarities, reference_gluon_pass
from tests.neighbour_checks import assert_same_neighbours

pytestmark = pytest.mark.skipif(
    not (
        gluon_available()
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability()[0] == 9
    ),
    reason="needs a Hopper GPU and Triton's Gluon",
)

GLUON_CONFIGS = [config for config in KERNEL_CONFIGS if config.kernel == "gluon"]
# Tiles in pairs over a ring of an odd size: a pair's tiles then straddle the ring's end.
ODD_RING = dataclasses.replace(KERNEL_CONFIGS[40], num_stages=7)


@pytest.mark.parametrize("config", [*GLUON_CONFIGS, ODD_RING], ids=lambda config: "-")
@pytest.mark.parametrize(
    ("batch", "rows", "dim", "k", "dtype", "masked"),
    [
        (256, 300_001, 128, 200, torch.bfloat16, True),  # a partial last tile, a valid mask
        (300, 70_000, 96, 20, torch.float16, False),  # 96 dims padded to 128, two query blocks
        (40, 5_000, 64, 10, torch.bfloat16, False),  # two groups, one idle; small tiles count
    ],
)
def test_the_gluon_passes_find_the_scans_neighbours(
    config: SearchKernelConfig, batch: int, rows: int, dim: int, k: int, dtype: torch.dtype,
    masked: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    launched: list[str] = []
    for name in ("gluon_bound_pass", "gluon_collect_pass"):
        build = getattr(search_gluon, name)

        def counted(*args: object, build=build, name=name, **kwargs: object) -> object:  # type: ignore[no-untyped-def]
            launched.append(name)
            return build(*args, **kwargs)

        monkeypatch.setattr(search_gluon, name, counted)
    generator = torch.Generator(device="cuda").manual_seed(0)
    memory = F.normalize(torch.randn(rows, dim, device="cuda", generator=generator), dim=1)
    memory = memory.to(dtype)
    query = F.normalize(torch.randn(batch, dim, device="cuda", generator=generator), dim=1)
    valid = torch.rand(rows, device="cuda", generator=generator) > 0.05 if masked else None
    ids = torch.randint(0, rows, (batch,), device="cuda", generator=generator)
    monkeypatch.setattr(search_triton._GLUON_FALLBACK, "failed", False)
    values, indices, overflowed = fused_knn_search(
        query, memory, k, query_ids=ids, memory_valid=valid, config=config
    )
    assert not search_triton._GLUON_FALLBACK.failed, "a Gluon pass failed: Triton's ran"
    assert launched == ["gluon_bound_pass", "gluon_collect_pass"], launched
    assert not bool(overflowed.any())
    scan = knn_search(query, memory, k, query_ids=ids, memory_valid=valid, backend="torch")
    assert_same_neighbours(KnnResult(values, indices), scan, atol=1e-5)
    # The same values as the Triton passes (its bound differs, not the neighbours).
    triton_values, _, _ = fused_knn_search(
        query, memory, k, query_ids=ids, memory_valid=valid, config=KERNEL_CONFIGS[0]
    )
    torch.testing.assert_close(values, triton_values, rtol=0, atol=1e-6)


def test_the_look_loss_is_the_scans_with_the_gluon_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The library path a training step takes (look_loss_terms → knn_search → the fused search
    with the process-wide kernel config) with a Gluon config: the scan's loss."""
    from look.losses import look_loss_terms

    monkeypatch.setattr(search_triton._GLUON_FALLBACK, "failed", False)
    monkeypatch.setattr(search_triton, "_kernel_config", GLUON_CONFIGS[0])
    launched: list[int] = []
    build = search_gluon.gluon_collect_pass

    def counted(*args: object, **kwargs: object) -> object:
        launched.append(1)
        return build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(search_gluon, "gluon_collect_pass", counted)
    generator = torch.Generator(device="cuda").manual_seed(1)
    memory = F.normalize(torch.randn(200_000, 128, device="cuda", generator=generator), dim=1)
    memory = memory.bfloat16()
    labels = torch.randint(0, 100, (200_000,), device="cuda", generator=generator)
    query = F.normalize(torch.randn(256, 128, device="cuda", generator=generator), dim=1)
    query_labels = torch.randint(0, 100, (256,), device="cuda", generator=generator)
    ids = torch.randint(0, 200_000, (256,), device="cuda", generator=generator)
    terms = {
        backend: look_loss_terms(
            query, query_labels, memory, labels, k=200, temperature=0.1, query_indices=ids,
            search_backend=backend,
        )
        for backend in ("triton", "torch")
    }  # fmt: skip
    assert launched and not search_triton._GLUON_FALLBACK.failed, "the Gluon passes did not run"
    torch.testing.assert_close(terms["triton"].loss, terms["torch"].loss, rtol=1e-5, atol=1e-5)


# 256·1,172 + 1 rows: with 16-, 32- and 64-row tiles the last tile holds one row, and it is a
# sampled tile of the bound pass at s = 4 (the tile count is 1 more than a multiple of 4).
PASS_CASES = [
    (256, 256 * 1172 + 1, 128, torch.bfloat16, True),
    (300, 70_000, 96, torch.float16, False),  # two query blocks; 96 dims padded to 128
    (40, 5_000, 64, torch.bfloat16, False),  # two groups, one idle
]


@pytest.mark.parametrize("config", GLUON_CONFIGS, ids=lambda config: "-")
@pytest.mark.parametrize(("batch", "rows", "dim", "dtype", "masked"), PASS_CASES)
def test_each_gluon_pass_writes_what_the_reference_does(
    config: SearchKernelConfig, batch: int, rows: int, dim: int, dtype: torch.dtype, masked: bool
) -> None:
    """Each pass alone against tests/gluon_reference.py: the bound pass's bins (every column
    written: they start as NaN), and the collect pass's appended rows for a bound of ~500
    rows per query. Says which pass is wrong when a search is; the products may differ from
    PyTorch's in their last bits (summation order), so rows within 1e-5 of the bound may go
    either way."""
    generator = torch.Generator(device="cuda").manual_seed(2)
    memory = F.normalize(torch.randn(rows, dim, device="cuda", generator=generator), dim=1)
    memory = memory.to(dtype)
    queries = F.normalize(torch.randn(batch, dim, device="cuda", generator=generator), dim=1)
    queries = queries.to(dtype)
    valid = torch.rand(rows, device="cuda", generator=generator) > 0.05 if masked else None
    valid_bytes = valid.view(torch.uint8) if valid is not None else None
    multiprocessors = torch.cuda.get_device_properties(0).multi_processor_count
    shape = {"block_n": config.block_n, "stages": config.num_stages, "groups": config.gluon_groups}
    sampled = _cdiv(_cdiv(rows, config.block_n), 4)
    columns = gluon_bound_columns(
        batch, sampled, block_n=config.block_n, groups=config.gluon_groups,
        multiprocessors=multiprocessors,
    )  # fmt: skip

    def bound_pass(tile_max: torch.Tensor) -> search_gluon.GluonPass:
        return gluon_bound_pass(
            queries, memory, valid_bytes, tile_max, sampled_tiles=sampled, tile_step=4,
            multiprocessors=multiprocessors, **shape,
        )  # fmt: skip

    bins = torch.full((batch, columns), float("nan"), device="cuda")
    bound_pass(bins).launch()
    expected_bins = torch.full_like(bins, float("nan"))
    reference = bound_pass(expected_bins)
    reference_gluon_pass(reference)
    torch.testing.assert_close(bins, expected_bins, rtol=0, atol=1e-5)

    products = pass_similarities(reference)
    bounds = products.topk(500, dim=1).values  # the bound: a column view, as in the search
    capacity = 2048

    def collect_pass(values: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor):  # type: ignore[no-untyped-def]
        return gluon_collect_pass(
            queries, memory, valid_bytes, bounds[:, -1], values, indices, counts,
            widen_bound=True, multiprocessors=multiprocessors,
            tile_pairs=config.gluon_tile_pairs, pair_release=config.gluon_pair_release,
            **shape,
        )  # fmt: skip

    values = torch.full((batch, capacity), float("nan"), device="cuda")
    indices = torch.full((batch, capacity), -1, dtype=torch.int64, device="cuda")
    counts = torch.zeros(batch, dtype=torch.int32, device="cuda")
    gluon_collect = collect_pass(values, indices, counts)
    gluon_collect.launch()
    widened = collect_bound(gluon_collect)
    assert int(counts.max()) <= capacity, "more candidates than the reference allows"
    filled = torch.arange(capacity, device="cuda") < counts[:, None]
    assert bool((indices[filled] >= 0).all()) and bool((indices[filled] < rows).all())
    rows_of = torch.where(filled, indices, 0)
    torch.testing.assert_close(
        values[filled], products.gather(1, rows_of)[filled], rtol=0, atol=1e-5
    )
    appended = torch.zeros_like(products, dtype=torch.int32)
    appended.scatter_add_(1, rows_of, filled.to(torch.int32))
    assert int(appended.max()) == 1, "a row was appended twice"
    allowed = products >= widened[:, None] - 1e-5
    required = products >= widened[:, None] + 1e-5
    if valid is not None:
        allowed &= valid
        required &= valid
    assert not bool((appended.bool() & ~allowed).any()), "a row below the bound was appended"
    assert not bool((required & ~appended.bool()).any()), "a row above the bound is missing"
