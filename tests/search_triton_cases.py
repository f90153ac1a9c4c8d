"""Checks of the fused Triton search, run by tests/test_search_triton.py in a child process with
``TRITON_INTERPRET=1`` (Triton reads it when the kernel is defined, so it cannot be set in-process).

Each case compares :func:`look.search.knn_search` (fused path) with the same call forced onto the
PyTorch scan. Run directly: ``TRITON_INTERPRET=1 python -m tests.search_triton_cases``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from look.search import KnnResult, knn_search
from look.search_triton import (
    QuantizedRows,
    SearchKernelConfig,
    fused_knn_search,
    fused_search_supported,
    get_kernel_config,
    set_kernel_config,
    tune_kernel_config,
)
from tests.interpreter_cases import run_cases, slow_case
from tests.neighbour_checks import assert_same_neighbours, overflowing_look_step

# The interpreter runs the fused selections' in-register sort one program at a time, far slower
# than torch.sort: the cases select with PyTorch, except those that test the fused selections
# (case_fused_selections_match_pytorchs, case_a_search_with_the_fused_selections_matches_the_scan).
FUSED_SELECTIONS = get_kernel_config()
assert FUSED_SELECTIONS.select == "fused"
set_kernel_config(dataclasses.replace(FUSED_SELECTIONS, select="sort"))


def _check_same(query: torch.Tensor, memory: torch.Tensor, k: int, **kwargs: object) -> None:
    assert fused_search_supported(query, memory, memory_ids=None)
    fused = knn_search(query, memory, k, backend="triton", **kwargs)  # type: ignore[arg-type]
    scan = knn_search(query, memory, k, backend="torch", **kwargs)  # type: ignore[arg-type]
    assert fused.values.shape == (query.shape[0], k)
    assert_same_neighbours(fused, scan, atol=1e-6)


def case_matches_scan() -> None:
    generator = torch.Generator().manual_seed(0)
    # (queries, rows, dim, k): ragged query block, dim not a power of two, bound pass with stride,
    # k larger than the candidates (padding), tiny memory.
    for batch, rows, dim, k in [
        (7, 3000, 32, 10),
        (33, 14000, 20, 25),  # s = 4, the default largest: 438 tiles >= 4 · 4 · 26
        (16, 500, 8, 600),
        (3, 5, 4, 2),
    ]:
        query = F.normalize(torch.randn(batch, dim, generator=generator), dim=1)
        memory = F.normalize(torch.randn(rows, dim, generator=generator), dim=1).half()
        valid = torch.rand(rows, generator=generator) > 0.2
        query_ids = torch.randint(0, rows, (batch,), generator=generator)
        _check_same(query, memory, k)
        _check_same(query, memory, k, query_ids=query_ids, memory_valid=valid)


def case_own_row_and_invalid_rows_excluded() -> None:
    memory = F.normalize(torch.randn(400, 16), dim=1).half()
    query = memory[:8].float()
    valid = torch.ones(400, dtype=torch.bool)
    valid[8:20] = False
    result = knn_search(
        query, memory, 30, query_ids=torch.arange(8), memory_valid=valid, backend="triton"
    )
    chosen = result.indices
    assert not (chosen == torch.arange(8).unsqueeze(1)).any(), "own row returned"
    assert not ((chosen >= 8) & (chosen < 20)).any(), "invalid row returned"


def case_excluded_rows_above_the_bound_are_never_collected() -> None:
    """The collect pass tests a tile's raw products against the bound and applies the row mask
    only to a tile that passes. Unwritten rows that copy the queries (similarity 1, above any
    bound) and the zero rows past the end of a memory whose valid rows all point away from the
    queries (bound < 0 < the padding's 0) must still never be kept, nor fill the buffer."""
    generator = torch.Generator().manual_seed(6)
    query = F.normalize(torch.randn(5, 16, generator=generator), dim=1)
    # 3,001 rows: the last tile is partial. Valid rows lean against the first query.
    away = F.normalize(-query[:1] + 0.3 * torch.randn(3001, 16, generator=generator), dim=1)
    memory = away.clone()
    valid = torch.ones(3001, dtype=torch.bool)
    copies = torch.arange(40, 3001, 37)  # 80 rows in many tiles, each a copy of a query
    memory[copies] = query[torch.arange(copies.numel()) % 5]
    valid[copies] = False
    memory = memory.half()
    values, indices, overflowed = fused_knn_search(query, memory, 15, memory_valid=valid)
    assert not overflowed.any()
    assert not torch.isin(indices, copies).any(), "an unwritten row was collected"
    assert bool((indices < 3001).all()) and bool((values[0] < 0).all())
    scan = knn_search(query, memory, 15, memory_valid=valid, backend="torch")
    assert_same_neighbours(KnnResult(values, indices), scan, atol=1e-6)


def case_neighbours_in_a_partial_last_tile_are_found_once() -> None:
    """The kernel's loads have no row-end masks: a partial last tile is shifted back to end at
    the last row, so it repeats rows of the tile before it. Queries that copy the last rows must
    find them, once each, whether that tile is partial or full, with the bound pass reading every
    s-th tile (s = 2 here) or every tile (s = 1, where a repeated row counted twice would lift
    the bound), and in the collect pass."""
    generator = torch.Generator().manual_seed(7)
    for rows in (2000, 2001, 2017, 2047, 2048, 2063, 700, 719):
        memory = F.normalize(torch.randn(rows, 16, generator=generator), dim=1)
        last = torch.arange(rows - 6, rows)
        query = memory[last]
        memory = memory.half()
        values, indices, overflowed = fused_knn_search(query, memory, 6)
        assert not overflowed.any()
        assert bool((indices[:, 0] == last).all()), (rows, indices[:, 0])
        for row in indices:  # no row twice (a tile run by two programs would repeat it)
            assert row.unique().numel() == row.numel(), (rows, row)
        scan = knn_search(query, memory, 6, backend="torch")
        assert_same_neighbours(KnnResult(values, indices), scan, atol=1e-6)


def case_a_row_repeated_by_the_shifted_last_tile_counts_once() -> None:
    """With s = 1 the bound pass reads every tile, and the shifted last tile repeats the first
    rows it overlaps: a query next to such a row would see its maximum twice, lift its bound to
    that row's similarity and lose its second neighbour, unless the repeat is excluded."""
    generator = torch.Generator().manual_seed(8)
    for rows in (700, 719):  # last tile of 28 and 15 rows, shifted back over 4 and 17 rows
        memory = F.normalize(torch.randn(rows, 16, generator=generator), dim=1)
        query = memory[[rows - 32, rows - 30]]  # rows in the repeated stretch
        memory = memory.half()
        for k in (2, 3):
            values, indices, overflowed = fused_knn_search(query, memory, k)
            assert not overflowed.any()
            scan = knn_search(query, memory, k, backend="torch")
            assert_same_neighbours(KnnResult(values, indices), scan, atol=1e-6)


def case_fused_selections_match_pytorchs() -> None:
    """The bound's radix select and the candidates' in-register sort against torch.sort: ties,
    -inf, k = 1 and k = every column, rows that are a strided view, candidate rows with garbage
    past their count (the collect pass never writes there), an overflowed row, the own row left
    out, fewer candidates than k."""
    import look.search_triton as search_triton

    generator = torch.Generator().manual_seed(9)
    wide = torch.randn(6, 1100, generator=generator).round(decimals=1)  # many ties
    wide[0, 500:] = float("-inf")
    wide[1] = float("-inf")
    values = wide[:, :1000]  # a view: row stride 1,100
    for k in (1, 7, 500, 1000):
        fused = search_triton._kth_largest(values, k, "fused")
        expected = values.sort(dim=1, descending=True).values[:, k - 1]
        assert torch.equal(fused, expected), (k, fused, expected)

    capacity, k = 300, 20
    candidates = torch.randn(5, capacity, generator=generator).round(decimals=2)
    rows = torch.randperm(100_000, generator=generator)[: 5 * capacity].view(5, capacity)
    # Full, few, none, overflow. 12 and 0 candidates sort 128 slots in the kernel, the others 512.
    counts = torch.tensor([300, 12, 0, 301, 150], dtype=torch.int32)
    assert search_triton._small_selection_block(512, k) == 128
    garbage = torch.arange(capacity) >= counts.clamp(max=capacity).unsqueeze(1)
    candidates[garbage] = float("nan")
    rows[garbage] = 7
    query_ids = rows[:, 3].clone()  # each query's own row sits in its buffer (unless past count)
    for ids in (None, query_ids):
        fused = search_triton._select_candidates(candidates, rows, counts, ids, k, "fused")
        torch_path = search_triton._select_candidates(candidates, rows, counts, ids, k, "sort")
        assert torch.equal(fused[1] >= 0, torch_path[1] >= 0)
        assert_same_neighbours(KnnResult(*fused), KnnResult(*torch_path), atol=0)
    fused_values, fused_rows = search_triton._select_candidates(
        candidates, rows, counts, query_ids, k, "fused"
    )
    assert not (fused_rows == query_ids.unsqueeze(1)).any()  # the own row left out
    assert bool((fused_values[1, 11:] == float("-inf")).all())  # 12 candidates, one own row
    assert bool((fused_rows[2] == -1).all()) and not fused_values.isnan().any()


def case_a_search_with_the_fused_selections_matches_the_scan() -> None:
    """The default config's fused selections inside the search: with a bound (leave-one-out, a
    valid mask), and without one (a small memory: every valid row is a candidate)."""
    generator = torch.Generator().manual_seed(10)
    for batch, rows, k in [(7, 3000, 10), (5, 500, 20)]:
        query = F.normalize(torch.randn(batch, 32, generator=generator), dim=1)
        memory = F.normalize(torch.randn(rows, 32, generator=generator), dim=1).half()
        valid = torch.rand(rows, generator=generator) > 0.2
        ids = torch.randint(0, rows, (batch,), generator=generator)
        values, indices, overflowed = fused_knn_search(
            query, memory, k, query_ids=ids, memory_valid=valid, config=FUSED_SELECTIONS
        )
        assert not overflowed.any()
        scan = knn_search(query, memory, k, query_ids=ids, memory_valid=valid, backend="torch")
        assert_same_neighbours(KnnResult(values, indices), scan, atol=1e-6)


def case_a_failing_selection_kernel_warns_once_and_selects_with_pytorch() -> None:
    import warnings

    import look.search_triton as search_triton

    class Broken:
        def __getitem__(self, grid: object) -> object:
            def launch(*args: object, **kwargs: object) -> None:
                raise RuntimeError("no such kernel on this GPU")

            return launch

    original = search_triton._kth_largest_kernel
    search_triton._kth_largest_kernel = Broken()
    values = torch.randn(4, 50)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = search_triton._kth_largest(values, 5, "fused")
            second = search_triton._kth_largest(values, 5, "fused")
        messages = [str(w.message) for w in caught if "selection kernels failed" in str(w.message)]
        assert len(messages) == 1, messages
        expected = values.sort(dim=1, descending=True).values[:, 4]
        assert torch.equal(first, expected) and torch.equal(second, expected)
    finally:
        search_triton._kth_largest_kernel = original
        search_triton._SELECT_FALLBACK.failed = False


def case_a_bound_pass_without_enough_valid_tiles_collects_every_valid_row() -> None:
    """Valid rows only in the first tiles: fewer than k + 1 sampled tile maxima are finite, the
    bound is -inf, and the collect pass widens it to the lowest finite value (every valid row,
    never an invalid one). With fewer valid rows than k, the result is padded."""
    generator = torch.Generator().manual_seed(3)
    memory = F.normalize(torch.randn(6_000, 16, generator=generator), dim=1).half()
    query = F.normalize(torch.randn(6, 16, generator=generator), dim=1)
    for valid_rows in (100, 15):
        valid = torch.zeros(6_000, dtype=torch.bool)
        valid[:valid_rows] = True
        ids = torch.tensor([0, 1, 2, 50, 10, 5_999])  # own rows: valid ones and an invalid one
        # Directly: through knn_search an overflow would be redone by the scan and hide a bound
        # left at -inf (which collects the 6,000 excluded rows too, past the buffer's 1,024).
        values, indices, overflowed = fused_knn_search(
            query, memory, 20, query_ids=ids, memory_valid=valid
        )
        assert not overflowed.any()
        scan = knn_search(query, memory, 20, query_ids=ids, memory_valid=valid, backend="torch")
        assert_same_neighbours(KnnResult(values, indices), scan, atol=1e-6)
        assert ((indices >= 0) == (values > float("-inf"))).all()
        assert indices.max() < valid_rows


def case_a_strided_valid_mask_is_read_by_row() -> None:
    """A mask that is a view with a stride (every other entry of a longer one) is read row by
    row, not as the bytes it happens to start at."""
    generator = torch.Generator().manual_seed(5)
    memory = F.normalize(torch.randn(3000, 16, generator=generator), dim=1).half()
    query = F.normalize(torch.randn(8, 16, generator=generator), dim=1)
    longer = torch.rand(6000, generator=generator) > 0.5
    valid = longer[::2]
    assert not valid.is_contiguous()
    _check_same(query, memory, 10, memory_valid=valid)


def case_overflow_falls_back_to_scan() -> None:
    # 3,000 identical rows: every one ties with the bound, the 1,024-slot buffer overflows.
    row = F.normalize(torch.randn(1, 16), dim=1)
    memory = torch.cat([row.repeat(3000, 1), F.normalize(torch.randn(30000, 16), dim=1)]).half()
    query = row + 0.01 * torch.randn(4, 16)
    _, _, overflowed = fused_knn_search(query, memory, 5)
    assert bool(overflowed.all()), "expected every query to overflow its buffer"
    fused = knn_search(query, memory, 5, backend="triton")
    scan = knn_search(query, memory, 5, backend="torch")
    torch.testing.assert_close(fused.values, scan.values, rtol=0, atol=0)
    assert bool((fused.indices < 3000).all())


def case_loss_recomputed_after_a_late_overflow_check() -> None:
    """The LOOK loss queues its terms before reading the fused search's overflow flag; when a
    query overflowed, the terms are recomputed from the exact neighbours."""
    from look.losses import look_loss_terms

    generator = torch.Generator().manual_seed(7)
    row = F.normalize(torch.randn(1, 16, generator=generator), dim=1)
    others = F.normalize(torch.randn(30000, 16, generator=generator), dim=1)
    memory = torch.cat([row.repeat(3000, 1), others]).half()  # 3,000 ties: the buffer overflows
    labels = torch.arange(memory.shape[0]) % 3
    query = torch.cat([row + 0.01 * torch.randn(2, 16, generator=generator), others[:2]])
    query = F.normalize(query, dim=1).requires_grad_(True)
    query_labels = torch.tensor([0, 1, 2, 0])
    _, _, overflowed = fused_knn_search(query.detach(), memory, 5)
    assert bool(overflowed[:2].all()), "expected the tied queries to overflow"
    grads = {}
    for backend in ("triton", "torch"):
        terms = look_loss_terms(
            query, query_labels, memory, labels, k=5, temperature=0.1, search_backend=backend
        )
        (grads[backend],) = torch.autograd.grad(terms.loss.sum(), query)
        grads[backend + "_terms"] = terms
    fused, scan = grads["triton_terms"], grads["torch_terms"]
    torch.testing.assert_close(fused.loss, scan.loss, rtol=0, atol=1e-6)
    assert torch.equal(fused.valid, scan.valid)
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=0, atol=1e-5)


def case_deferred_overflow_is_flagged_and_the_exact_redo_matches_the_scan() -> None:
    """The trainer's way (look.engine.trainer): LOOK leaves the overflow flag to the caller
    (``defer_exactness_check``) on an accelerator; an overflowing step says it is inexact, its loss
    is really wrong, and the step recomputed under ``exact_redo`` equals the scan's loss."""
    import importlib

    from look.methods import Batch, MethodContext, build_method
    from look.models import create_backbone

    # The accelerator's code paths (no host reads in the step), on the CPU.
    modules = [
        importlib.import_module(name)
        for name in ("look.methods.look", "look.memory", "look.search", "look.losses.look_loss")
    ]
    originals = [module.host_reads_are_free for module in modules]  # type: ignore[attr-defined]
    for module in modules:
        module.host_reads_are_free = lambda device: False  # type: ignore[attr-defined]
    try:
        torch.manual_seed(0)
        backbone, feature_dim = create_backbone("look_cnn_small")
        rows = 8000
        options = {"name": "look", "k": 20, "temperature": 0.1, "memory_dtype": "float16"}
        method = build_method(options, backbone, feature_dim, MethodContext(5, rows)).train()
        generator = torch.Generator().manual_seed(0)
        batch = Batch(
            views=[torch.randn(16, 3, 28, 28, generator=generator)],
            labels=torch.randint(0, 5, (16,), generator=generator),
            indices=torch.randperm(rows, generator=generator)[:16],
        )
        # 2,400 copies of query 0's embedding: its buffer overflows.
        deferred, redone, expected = overflowing_look_step(
            method, batch, copies=2400, generator=generator
        )
        torch.testing.assert_close(redone.loss, expected, rtol=0, atol=1e-6)
        assert abs(float(deferred.loss.detach()) - float(expected.detach())) > 1e-3, (
            "the overflow changed nothing"
        )
        print(
            f"  deferred loss {float(deferred.loss.detach()):.3f}, exact {float(expected.detach()):.3f}"
        )
    finally:
        for module, original in zip(modules, originals, strict=True):
            module.host_reads_are_free = original  # type: ignore[attr-defined]


@slow_case
def case_tune_kernel_config_sets_the_fastest() -> None:
    memory = F.normalize(torch.randn(5000, 16), dim=1).half()
    query = F.normalize(torch.randn(8, 16), dim=1)
    configs = (SearchKernelConfig(16, 32, 4, 2, "topk"), SearchKernelConfig(16, 64, 4, 2, "sort"))
    default = get_kernel_config()
    try:
        results = tune_kernel_config(query, memory, 10, configs=configs, repeats=1)
        assert [config for config, _ in results] == sorted(configs, key=dict(results).get)
        assert get_kernel_config() == results[0][0]
        timings: dict[str, float] = {}
        fused_knn_search(query, memory, 10, timings=timings)
        assert {"bound_pass", "collect_pass", "select_topk"} <= set(timings)
        # Every query keeps at least its 10 neighbours: some tiles took the append path.
        assert 0 < timings["hit_tile_frac"] <= 1
    finally:
        set_kernel_config(default)


@slow_case
def case_tuner_skips_a_config_that_returns_wrong_neighbours() -> None:
    import warnings

    import look.search_triton as search_triton

    memory = F.normalize(torch.randn(5000, 16), dim=1).half()
    query = F.normalize(torch.randn(8, 16), dim=1)
    good, bad = SearchKernelConfig(16, 32, 4, 2, "sort"), SearchKernelConfig(16, 64, 4, 2, "sort")
    original = search_triton.fused_knn_search

    def broken_for_bad(*args: object, **kwargs: object) -> tuple[torch.Tensor, ...]:
        values, indices, overflowed = original(*args, **kwargs)  # type: ignore[arg-type]
        if kwargs.get("config") == bad:
            values = values - 0.5  # as a miscompiled kernel might
        return values, indices, overflowed

    default = get_kernel_config()
    search_triton.fused_knn_search = broken_for_bad  # type: ignore[assignment]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = tune_kernel_config(query, memory, 10, configs=(bad, good), repeats=1)
        assert [config for config, _ in results] == [good]
        assert any("other neighbours than the exact scan" in str(w.message) for w in caught)
    finally:
        search_triton.fused_knn_search = original  # type: ignore[assignment]
        set_kernel_config(default)


@slow_case
def case_collect_variants_match_scan() -> None:
    """The collect variants number and filter candidates differently, never change them; nor
    with the int8 copy (its row scales and errors loaded under row-end masks with bulk copies,
    its precise test on every tile without the skip)."""
    default = get_kernel_config()
    generator = torch.Generator().manual_seed(5)
    memory = F.normalize(torch.randn(6000, 16, generator=generator), dim=1).half()
    query = F.normalize(torch.randn(20, 16, generator=generator), dim=1)
    valid = torch.rand(6000, generator=generator) > 0.2
    copy = QuantizedRows.from_memory(memory)
    try:
        for config in (
            SearchKernelConfig(32, 32, 4, 2, "topk", "atomic"),
            SearchKernelConfig(32, 32, 4, 2, "sort", "atomic", skip_empty_tiles=False),
            SearchKernelConfig(16, 32, 4, 2, "sort", "scan", tile_stride=2),
            SearchKernelConfig(32, 32, 4, 2, "sort", "atomic", loads="tma"),
            SearchKernelConfig(32, 32, 4, 2, "sort", "scan", loads="tma"),
        ):
            set_kernel_config(config)
            _check_same(query, memory, 7, query_ids=torch.arange(20) * 50, memory_valid=valid)
            _check_same(query, memory, 7, query_ids=torch.arange(20) * 50, memory_valid=valid,
                        prefilter=copy)  # fmt: skip
    finally:
        set_kernel_config(default)


def case_queries_rounded_in_the_kernel_match_queries_rounded_by_torch() -> None:
    """query_operand "registers" passes fp32 queries and rounds them in the kernel: the same
    values and rows as rounding them first (queries that are not
    exactly representable, so the rounding is exercised). (fp16 only: the interpreter computes
    through numpy, which has no bf16; the CUDA tests check bf16.)"""
    generator = torch.Generator().manual_seed(12)
    shared = dataclasses.replace(get_kernel_config(), select="sort")
    registers = dataclasses.replace(shared, query_operand="registers")
    query = F.normalize(torch.randn(9, 32, generator=generator), dim=1) * (1 + 1e-3)
    for dtype in (torch.float16,):
        memory = F.normalize(torch.randn(4000, 32, generator=generator), dim=1).to(dtype)
        ids = torch.randint(0, 4000, (9,), generator=generator)
        expected = fused_knn_search(query, memory, 12, query_ids=ids, config=shared)
        rounded = fused_knn_search(query, memory, 12, query_ids=ids, config=registers)
        assert torch.equal(rounded[0], expected[0]), dtype
        assert torch.equal(rounded[1], expected[1]), dtype
        assert not rounded[2].any()
        # ...and the same as the exact scan over the memory
        _check_same(query, memory, 12, query_ids=ids)


def case_bound_from_few_kept_tile_maxima_stays_exact() -> None:
    """Each bound-pass program keeps only its largest tile maxima. When one program's tiles hold
    more of the top rows than it keeps, the bound is looser (more candidates), never wrong."""
    import look.search_triton as search_triton

    generator = torch.Generator().manual_seed(6)
    memory = F.normalize(torch.randn(20000, 16, generator=generator), dim=1)
    query = F.normalize(torch.randn(3, 16, generator=generator), dim=1)
    # With 4 programs and stride 4, program 0 of the bound pass reads tiles 0, 16, 32, ...: put
    # 4 rows near query 0 in each of its first 10 tiles (40 near rows, 8 wanted).
    for tile in range(10):
        start = 16 * 32 * tile
        noise = 0.05 * torch.randn(4, 16, generator=generator)
        memory[start : start + 4] = F.normalize(query[0] + noise, dim=1)
    memory = memory.half()
    plan = search_triton._search_plan
    seen: dict[str, int] = {}

    def keep_four(*args: object, **kwargs: object) -> object:
        result = dataclasses.replace(plan(*args, **kwargs), bound_keep=4)  # type: ignore[arg-type]
        seen.update(programs=result.bound_programs, stride=result.tile_stride)
        return result

    search_triton._search_plan = keep_four  # type: ignore[assignment]
    try:
        timings: dict[str, float] = {}
        values, indices, overflowed = fused_knn_search(query, memory, 8, timings=timings)
        assert seen == {"programs": 4, "stride": 4}, seen
        assert not bool(overflowed.any())
        assert bool((indices[0] % 512 < 4).all()), "query 0 must find the planted rows"
        scan = knn_search(query, memory, 8, backend="torch")
        torch.testing.assert_close(values, scan.values, rtol=0, atol=1e-6)
        assert_same_neighbours(knn_search(query, memory, 8, backend="triton"), scan, atol=1e-6)
    finally:
        search_triton._search_plan = plan  # type: ignore[assignment]
    every_maximum: dict[str, float] = {}
    fused_knn_search(query, memory, 8, timings=every_maximum)
    # The case really loosens the bound: more candidates than with every tile maximum kept.
    assert timings["mean_candidates"] > every_maximum["mean_candidates"], (timings, every_maximum)


def case_a_bound_pass_of_bins_stays_exact() -> None:
    """``bound_bins``: each bound-pass program keeps, per query, the largest product at each
    position of its tiles (bins of disjoint rows). Exact with a ragged query block, a partial
    last tile shifted back over a skipped tile (s >= 2) or over a read one (s = 1, its repeated
    rows excluded), leave-one-out with a valid mask, and top rows packed into one bin's
    positions (several in one bin: a looser bound, never a wrong one); and with the int8 copy
    read by the bound pass (lower bounds taken on the bins after the loop)."""
    generator = torch.Generator().manual_seed(12)
    bins = dataclasses.replace(get_kernel_config(), bound_bins=True)
    # 6,030 rows: 189 tiles, the last (sampled at s = 4) 14 rows long; 3,000: 94 tiles, s = 1.
    for batch, rows, dim, k, stride in [(7, 6030, 32, 10, 4), (33, 3000, 20, 5, 1)]:
        query = F.normalize(torch.randn(batch, dim, generator=generator), dim=1)
        memory = F.normalize(torch.randn(rows, dim, generator=generator), dim=1)
        memory[5::32][:40] = F.normalize(query[0] + 0.05 * torch.randn(40, dim), dim=1)
        memory = memory.half()
        valid = torch.rand(rows, generator=generator) > 0.2
        ids = torch.randint(0, rows, (batch,), generator=generator)
        values, indices, overflowed = fused_knn_search(
            query, memory, k, config=bins, max_tile_stride=stride, query_ids=ids,
            memory_valid=valid,
        )  # fmt: skip
        assert not bool(overflowed.any())
        scan = knn_search(query, memory, k, backend="torch", query_ids=ids, memory_valid=valid)
        assert_same_neighbours(KnnResult(values, indices), scan, atol=1e-6)
    both = dataclasses.replace(bins, int8_bound_pass=True)
    values, indices, _ = fused_knn_search(
        query, memory, 5, config=both, prefilter=QuantizedRows.from_memory(memory)
    )
    assert_same_neighbours(KnnResult(values, indices), knn_search(query, memory, 5, backend="torch"),
                           atol=1e-6)  # fmt: skip


def case_the_search_around_the_gluon_passes_finds_the_scans_neighbours() -> None:
    """The Gluon passes' host side (their grid on a GPU of 6 SMs, the bins' column count, the
    k-th largest bin as the bound, the collect pass's widened bound and buffers, the
    selections), each pass computed by tests/gluon_reference.py since Triton's interpreter
    cannot run Gluon: the scan's neighbours, with leave-one-out, a valid mask and a partial last
    tile, for two and four query groups (one and two query blocks) and each Gluon config."""
    import look.search_gluon as search_gluon
    import look.search_triton as search_triton
    from tests.gluon_reference import reference_gluon_pass

    launched: list[bool] = []

    def launch(gluon_pass: search_gluon.GluonPass) -> None:
        launched.append(bool(gluon_pass.constexprs["COLLECT"]))
        reference_gluon_pass(gluon_pass)

    saved = (search_triton._multiprocessor_count, search_gluon.gluon_applies,
             search_gluon.GluonPass.launch)  # fmt: skip
    search_triton._multiprocessor_count = lambda device: 6
    search_gluon.gluon_applies = lambda queries, memory: True
    search_gluon.GluonPass.launch = launch  # type: ignore[method-assign]
    generator = torch.Generator().manual_seed(13)
    try:
        for gluon_config in [c for c in search_triton.KERNEL_CONFIGS if c.kernel == "gluon"]:
            config = dataclasses.replace(gluon_config, select="sort")
            for batch, rows, dim, k in [(70, 6030, 32, 10), (300, 3001, 16, 5)]:
                query = F.normalize(torch.randn(batch, dim, generator=generator), dim=1)
                memory = F.normalize(torch.randn(rows, dim, generator=generator), dim=1).half()
                valid = torch.rand(rows, generator=generator) > 0.2
                ids = torch.randint(0, rows, (batch,), generator=generator)
                launched.clear()
                values, indices, overflowed = fused_knn_search(
                    query, memory, k, config=config, query_ids=ids, memory_valid=valid
                )
                assert launched == [False, True], launched  # both passes were Gluon's
                assert not bool(overflowed.any())
                scan = knn_search(
                    query, memory, k, backend="torch", query_ids=ids, memory_valid=valid
                )
                assert_same_neighbours(KnnResult(values, indices), scan, atol=1e-6)
    finally:
        (search_triton._multiprocessor_count, search_gluon.gluon_applies,
         search_gluon.GluonPass.launch) = saved  # fmt: skip


@slow_case
def case_replayed_searches_return_their_own_queries_neighbours() -> None:
    """set_graph_replay: the first search of a key runs eagerly and is recorded, later ones
    copy their queries and ids into the recording, replay it and copy its outputs out (a
    result stays the same after later replays). A recorder that stands in for CUDA graphs
    (its replay reruns the recorded search into the recorded outputs, as a graph does) lets
    the interpreter check the host side: keys, copies, the bound on recordings, and that a
    failing recorder warns once and leaves eager searches. On a GPU,
    tests/test_search_cuda.py checks real recordings."""
    import warnings

    import look.search_triton as search_triton

    recorded: list[int] = []

    def record(run, device):  # type: ignore[no-untyped-def]
        outputs = run()
        recorded.append(outputs[0].shape[0])

        def replay() -> None:
            for output, fresh in zip(outputs, run(), strict=True):
                output.copy_(fresh)

        return replay, outputs

    saved = (search_triton._GRAPH_DEVICE_TYPES, search_triton._record_cuda_graph,
             search_triton._MAX_RECORDINGS)  # fmt: skip
    search_triton._GRAPH_DEVICE_TYPES = ("cuda", "cpu")
    search_triton._MAX_RECORDINGS = 3
    search_triton._record_cuda_graph = record  # type: ignore[assignment]
    search_triton.set_graph_replay(True)
    generator = torch.Generator().manual_seed(14)
    memory = F.normalize(torch.randn(800, 16, generator=generator), dim=1).half()
    valid = torch.rand(800, generator=generator) > 0.1
    config = get_kernel_config()

    def search(batch_queries: torch.Tensor, bank: torch.Tensor = memory):  # type: ignore[no-untyped-def]
        ids = torch.randint(0, 800, (batch_queries.shape[0],), generator=generator)
        values, indices, overflowed = fused_knn_search(
            batch_queries, bank, 7, query_ids=ids, memory_valid=valid, config=config
        )
        assert not bool(overflowed.any())
        scan = knn_search(batch_queries, bank, 7, backend="torch", query_ids=ids,
                          memory_valid=valid)  # fmt: skip
        assert_same_neighbours(KnnResult(values, indices), scan, atol=1e-6)
        return KnnResult(values, indices), scan

    def queries(batch: int) -> torch.Tensor:
        return F.normalize(torch.randn(batch, 16, generator=generator), dim=1)

    try:
        search(queries(9))  # eager, then recorded
        assert recorded == [9]
        second, second_scan = search(queries(9))  # replayed
        search(queries(9))  # replayed again: the recording's outputs change
        assert recorded == [9]
        assert_same_neighbours(second, second_scan, atol=1e-6)  # (copied out, not a view)
        search(queries(9), memory.clone())  # another memory: another recording
        search(queries(5))  # another batch size: another recording
        assert recorded == [9, 9, 5]
        # Replayed searches that overflow: knn_search redoes those queries with the scan from
        # the replay's copied flags and values, as the LOOK loss does.
        row = F.normalize(torch.randn(1, 16, generator=generator), dim=1)
        crowded = torch.cat([row.repeat(1100, 1), F.normalize(torch.randn(200, 16), dim=1)]).half()
        for _ in range(3):  # eager and recorded, then replayed twice
            near = row + 0.01 * torch.randn(4, 16, generator=generator)
            assert bool(fused_knn_search(near, crowded, 5)[2].all())  # 1,024 slots overflowed
            fused = knn_search(near, crowded, 5, backend="triton")
            scan = knn_search(near, crowded, 5, backend="torch")
            torch.testing.assert_close(fused.values, scan.values, rtol=0, atol=0)
        assert recorded == [9, 9, 5, 4]
        for batch in range(10, 10 + search_triton._MAX_RECORDINGS):
            search(queries(batch))
        assert len(search_triton._RECORDINGS) == search_triton._MAX_RECORDINGS
        search_triton.set_graph_replay(False)  # off: recordings dropped, searches eager
        assert not search_triton._RECORDINGS
        search(queries(9))
        assert len(recorded) == 4 + search_triton._MAX_RECORDINGS

        def broken(run, device):  # type: ignore[no-untyped-def]
            raise RuntimeError("no graphs here")

        search_triton._record_cuda_graph = broken  # type: ignore[assignment]
        search_triton.set_graph_replay(True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            search(queries(9))
            search(queries(9))
        messages = [str(w.message) for w in caught if "CUDA graph" in str(w.message)]
        assert len(messages) == 1 and "no graphs here" in messages[0], messages
        assert not search_triton._replays_graphs(torch.device("cpu"))
    finally:
        search_triton.set_graph_replay(False)
        (search_triton._GRAPH_DEVICE_TYPES, search_triton._record_cuda_graph,
         search_triton._MAX_RECORDINGS) = saved  # fmt: skip
        search_triton._GRAPH_FALLBACK.failed = False


def case_empty_batch() -> None:
    memory = F.normalize(torch.randn(300, 8), dim=1).half()
    result = knn_search(torch.empty(0, 8), memory, 5, backend="triton")
    assert result.values.shape == (0, 5) and result.indices.shape == (0, 5)


def case_sharded_loss_uses_fused_search_with_same_terms() -> None:
    """A shard is searched by local row (no memory_ids), so the fused search serves it too."""
    from look.sharded import ShardedMemoryBank, sharded_look_loss_terms

    generator = torch.Generator().manual_seed(4)
    bank = ShardedMemoryBank(3000, 16, dtype=torch.float16)  # the interpreter lacks bf16
    ids = torch.randperm(3000, generator=generator)[:2500]
    bank.update(ids, torch.randn(2500, 16, generator=generator), ids % 7)
    query = F.normalize(torch.randn(24, 16, generator=generator), dim=1)
    labels = torch.randint(0, 7, (24,), generator=generator)
    query_ids = ids[:24]  # their own rows are written: leave-one-out must drop them
    terms = {}
    for backend in ("triton", "torch"):
        terms[backend] = sharded_look_loss_terms(
            query, labels, bank, k=20, temperature=0.1, query_indices=query_ids,
            search_backend=backend,
        )  # fmt: skip
    torch.testing.assert_close(terms["triton"].loss, terms["torch"].loss, rtol=0, atol=1e-6)
    assert torch.equal(terms["triton"].neighbour_indices, terms["torch"].neighbour_indices)
    assert not (terms["triton"].neighbour_indices == query_ids.unsqueeze(1)).any()
    assert terms["triton"].inexact is None  # waited for inside, unless deferred
    # A shard with an int8 copy: its fused search reads the copy, with the same terms.
    int8_bank = ShardedMemoryBank(3000, 16, dtype=torch.float16, int8_prefilter=True)
    int8_bank.load_state_dict(bank.state_dict())  # the same rows (the copy is built from them)
    int8_terms = sharded_look_loss_terms(
        query, labels, int8_bank, k=20, temperature=0.1, query_indices=query_ids,
        search_backend="triton",
    )  # fmt: skip
    assert int8_bank.search_prefilter() is not None
    torch.testing.assert_close(int8_terms.loss, terms["torch"].loss, rtol=0, atol=1e-6)
    assert torch.equal(int8_terms.neighbour_indices, terms["torch"].neighbour_indices)

    # Deferred, an overflow of the shard's search is returned as `inexact` (a row copied 1,200
    # times, without momentum, next to query 0 overflows its buffer), and the wrong terms with it.
    copies = torch.arange(1200)
    bank.fill_(copies, query[:1].repeat(1200, 1), torch.zeros(1200, dtype=torch.int64))
    deferred = sharded_look_loss_terms(
        query, labels, bank, k=20, temperature=0.1, query_indices=query_ids,
        search_backend="triton", defer_exactness_check=True,
    )  # fmt: skip
    exact = sharded_look_loss_terms(
        query, labels, bank, k=20, temperature=0.1, query_indices=query_ids,
        search_backend="torch",
    )  # fmt: skip
    assert deferred.inexact is not None and bool(deferred.inexact)
    assert not torch.equal(deferred.neighbour_indices, exact.neighbour_indices)


@slow_case
def case_int8_prefilter_matches_scan() -> None:
    """Reading an int8 copy (QuantizedRows) the search still finds the exact neighbours: ragged
    query blocks, a dim that is not a power of two, leave-one-out with a valid mask, a memory
    smaller than k; rows of mixed norms with one dominant coordinate (coarse int8 steps for the
    rest) and near-duplicates of a query that tie around the k-th."""
    generator = torch.Generator().manual_seed(11)
    for batch, rows, dim, k in [(7, 3000, 32, 10), (33, 8000, 20, 25), (3, 5, 4, 2)]:
        query = F.normalize(torch.randn(batch, dim, generator=generator), dim=1)
        memory = F.normalize(torch.randn(rows, dim, generator=generator), dim=1).half()
        valid = torch.rand(rows, generator=generator) > 0.2
        query_ids = torch.randint(0, rows, (batch,), generator=generator)
        prefilter = QuantizedRows.from_memory(memory)
        if batch == 7:
            _check_same(query, memory, k, prefilter=prefilter)
            both = dataclasses.replace(get_kernel_config(), int8_bound_pass=True)
            values, indices, _ = fused_knn_search(query, memory, k, prefilter=prefilter,
                                                  config=both, query_ids=query_ids)  # fmt: skip
            scan = knn_search(query, memory, k, backend="torch", query_ids=query_ids)
            assert_same_neighbours(KnnResult(values, indices), scan, atol=1e-6)
            # The query parts passed as int16 and narrowed in the kernel (operands in registers).
            registers = dataclasses.replace(get_kernel_config(), query_operand="registers")
            values, indices, _ = fused_knn_search(query, memory, k, prefilter=prefilter,
                                                  config=registers)  # fmt: skip
            scan = knn_search(query, memory, k, backend="torch")
            assert_same_neighbours(KnnResult(values, indices), scan, atol=1e-6)
        _check_same(query, memory, k, prefilter=prefilter, query_ids=query_ids, memory_valid=valid)
    query = F.normalize(torch.randn(9, 16, generator=generator), dim=1)
    memory = F.normalize(torch.randn(6000, 16, generator=generator), dim=1)
    memory[:2000, 0] += 3.0
    memory = memory * (0.1 + 2 * torch.rand(6000, 1, generator=generator))
    memory[3000:3300] = query[0] + 1e-3 * torch.randn(300, 16, generator=generator)
    memory = memory.half()
    _check_same(query, memory, 40, prefilter=QuantizedRows.from_memory(memory))
    # A bound as tight as it gets (every tile read, one close neighbour per tile, similarities
    # far closer together than int8's error): without its error slack the pre-filter would
    # keep the k rows of largest *approximate* similarity, other rows than the exact search's.
    tiles, k = 300, 60
    memory = -F.normalize(torch.randn(tiles * 32, 16, generator=generator), dim=1) * 0.1
    memory[::32] = F.normalize(
        query[1] + 0.05 * torch.randn(tiles, 16, generator=generator), dim=1
    )
    memory = memory.half()
    scan = knn_search(query[1:2], memory, k, backend="torch")
    # The bound pass reading the fp16 rows (the default) or the int8 copy too.
    for int8_bound_pass in (False, True):
        config = dataclasses.replace(get_kernel_config(), int8_bound_pass=int8_bound_pass)
        values, indices, overflowed = fused_knn_search(
            query[1:2], memory, k, max_tile_stride=1, config=config,
            prefilter=QuantizedRows.from_memory(memory),
        )  # fmt: skip
        assert not bool(overflowed.any())
        assert_same_neighbours(KnnResult(values, indices), scan, atol=1e-6)
    try:
        knn_search(query, memory, 5, backend="triton",
                   prefilter=QuantizedRows.from_memory(memory[:100]))  # fmt: skip
    except ValueError as error:
        assert "must be a copy of this memory" in str(error)
    else:
        raise AssertionError("a copy of another memory was accepted")


def case_a_bank_with_an_int8_copy_gives_the_loss_of_the_scan() -> None:
    """A bank built with int8_prefilter keeps its copy in step with its momentum writes, and
    the LOOK loss computed by the fused search through that copy equals the scan's."""
    from look.losses import look_loss_terms
    from look.memory import MemoryBank

    generator = torch.Generator().manual_seed(12)
    bank = MemoryBank(4000, 16, momentum=0.5, dtype="float16", int8_prefilter=True)
    for _ in range(3):  # the copy exists from the first search on; later writes update it
        ids = torch.randint(0, 4000, (3000,), generator=generator)
        bank.update(ids, torch.randn(3000, 16, generator=generator),
                    torch.randint(0, 5, (3000,), generator=generator))  # fmt: skip
        assert bank.search_prefilter() is not None
    copy = bank.search_prefilter()
    assert copy is not None
    assert torch.equal(copy.values, QuantizedRows.from_memory(bank.features).values)
    query = F.normalize(torch.randn(12, 16, generator=generator), dim=1)
    labels = torch.randint(0, 5, (12,), generator=generator)
    terms = {}
    for backend in ("triton", "torch"):
        terms[backend] = look_loss_terms(
            query, labels, bank.features, bank.labels, k=30, temperature=0.1,
            query_indices=torch.arange(12), memory_valid=bank.search_valid(),
            search_backend=backend, search_prefilter=copy,
        )  # fmt: skip
    torch.testing.assert_close(terms["triton"].loss, terms["torch"].loss, rtol=0, atol=1e-6)
    assert torch.equal(terms["triton"].neighbour_indices, terms["torch"].neighbour_indices)


def case_the_int8_copys_write_kernel_writes_what_pytorch_does() -> None:
    """A GPU write of the int8 copy runs one Triton kernel: the same int8 values and scales as
    the PyTorch path, error bounds within rounding of it (and above the true error), the
    running bounds raised, never lowered; rows at scattered positions."""
    from look.search_triton import _write_quantized_rows

    generator = torch.Generator().manual_seed(13)
    rows = torch.randn(300, 20, generator=generator) * torch.rand(300, 1, generator=generator) * 5
    rows[:10, 3] = 40.0  # one dominant coordinate
    rows[10:15] = 0.0  # zero rows: scale 0, error 0
    rows = rows.half()
    positions = torch.randperm(1000, generator=generator)[:300]
    memory = torch.zeros(1000, 20, dtype=torch.float16)
    memory[positions] = rows
    expected = QuantizedRows.from_memory(memory)  # the PyTorch path on CPU
    written = QuantizedRows.from_memory(torch.zeros(1000, 20, dtype=torch.float16))
    _write_quantized_rows(written, positions, rows)
    assert torch.equal(written.values, expected.values)
    assert torch.equal(written.scales, expected.scales)
    torch.testing.assert_close(written.errors, expected.errors, rtol=1e-6, atol=0)
    torch.testing.assert_close(written.norm_bound, expected.norm_bound, rtol=1e-6, atol=0)
    torch.testing.assert_close(written.error_bound, expected.error_bound, rtol=1e-6, atol=0)
    exact = (memory.double() - written.values.double() * written.scales.double()[:, None])
    assert (exact.norm(dim=1) <= written.errors.double()).all()
    before = written.norm_bound.clone()
    _write_quantized_rows(written, positions[:5], rows[:5] / 100)  # smaller rows
    assert torch.equal(written.norm_bound, before)


if __name__ == "__main__":
    run_cases(globals())
