"""The fused Triton search against the PyTorch scan (CPU, Triton's interpreter) and its dispatch."""

from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import torch

from look.search import knn_search
from look.search_triton import fused_search_supported, triton_available
from tests.interpreter_cases import run_case_module


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_fused_search_equals_scan_in_triton_interpreter() -> None:
    output = run_case_module("tests.search_triton_cases", speed="fast")
    assert output.count(": ok") == 21, output


@pytest.mark.slow
@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_other_kernel_configs_replay_and_the_tuner_in_triton_interpreter() -> None:
    """The cases left out of the default suite for time (~75 s of interpreter): the collect
    variants and the int8 pre-filter (neither the default), replay, and the tuner."""
    output = run_case_module("tests.search_triton_cases", speed="slow")
    assert output.count(": ok") == 5, output


def test_cpu_memory_uses_the_scan_and_triton_backend_refuses_it() -> None:
    query = torch.randn(4, 8)
    memory = torch.randn(50, 8).half()
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not fused_search_supported(query, memory, memory_ids=None)
        with pytest.raises(ValueError, match="backend='triton' needs"):
            knn_search(query, memory, 3, backend="triton")
    # An fp32 memory never takes the fused path (TF32 tensor cores would not be exact).
    assert not fused_search_supported(query, memory.float(), memory_ids=None)
    assert not fused_search_supported(query, memory, memory_ids=torch.arange(50))


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="backend must be"):
        knn_search(torch.randn(2, 4), torch.randn(10, 4), 3, backend="faiss")


def test_a_failing_kernel_warns_once_and_auto_falls_back_to_the_scan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import look.search as search_module

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(search_module, "fused_search_supported", lambda *a, **kw: True)
    monkeypatch.setattr(search_module, "fused_knn_search", broken)
    monkeypatch.setattr(search_module._SEARCH_FALLBACK, "failed", False)
    query, memory = torch.randn(4, 8), torch.randn(50, 8).half()
    expected = knn_search(query, memory, 3, backend="torch")
    with pytest.warns(RuntimeWarning, match="no kernel for this GPU"):
        result = knn_search(query, memory, 3)
    assert torch.equal(result.indices, expected.indices)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call neither retries nor warns
        knn_search(query, memory, 3)
    with pytest.raises(RuntimeError, match="no kernel"):  # an explicit request still fails loudly
        knn_search(query, memory, 3, backend="triton")


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_hit_tile_fraction_counts_each_tile_once_per_query_block() -> None:
    """The benchmark figure of how many (query block, tile) pairs take the append path: a tile
    counts once per block however many of the block's queries keep rows in it; slots past a
    query's count (never written) count for nothing."""
    from look.search_triton import KERNEL_CONFIGS, _hit_tile_fraction, _search_plan

    plan = _search_plan(32, 320, 2, KERNEL_CONFIGS[0], multiprocessors=132)
    assert (plan.block_q, plan.query_blocks, plan.total_tiles) == (32, 1, 10)
    candidates = torch.full((32, 4), 7)  # past each query's count: never read
    counts = torch.zeros(32, dtype=torch.int32)
    candidates[0], counts[0] = torch.tensor([0, 31, 32, 7]), 3  # tiles 0, 0, 1
    candidates[5], counts[5] = torch.tensor([33, 319, 7, 7]), 2  # tiles 1, 9
    assert _hit_tile_fraction(candidates, counts, plan, 32) == 3 / 10
    # Two blocks of 16 queries: the same tiles count again for the second block.
    plan = _search_plan(32, 320, 2, dataclasses.replace(KERNEL_CONFIGS[0], block_q=16),
                        multiprocessors=132)  # fmt: skip
    candidates[20], counts[20] = torch.tensor([0, 64, 65, 7]), 3  # block 1: tiles 0, 2
    assert _hit_tile_fraction(candidates, counts, plan, 32) == (3 + 2) / 20
    counts[20] = 5  # an overflowed query: all its slots were written
    assert _hit_tile_fraction(candidates, counts, plan, 32) == (3 + 2) / 20


def _prefilter_error_and_slack(
    queries: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(|exact - approx|, slack)`` per (query, row), in fp64, of the int8 pre-filter's
    similarities as the kernel forms them (``254·hi + lo`` in int32, converted, scaled by the
    row's scale, then by the query's factor, in fp32) against the exact product of the rounded
    query and the stored row. Also checks the widest slack (the largest row error's) against
    every error."""
    from look.search_triton import QuantizedRows, _quantize_queries

    copy = QuantizedRows.from_memory(rows)
    high, low, terms = _quantize_queries(queries.to(rows.dtype), copy)
    factor, query_norm, query_slack, widest = terms
    combined = (high.double() * 254 + low.double()) @ copy.values.double().T  # exact integers
    approx = (combined.float() * copy.scales[None, :]) * factor[:, None]
    exact = queries.to(rows.dtype).double() @ rows.double().T
    slack = query_norm.double()[:, None] * copy.errors.double()[None, :] + query_slack.double()[:, None]
    error = (exact - approx.double()).abs()
    assert (error <= widest.double()[:, None]).all()  # the bound pass's and the gate's slack
    return error, slack


@pytest.mark.parametrize("dim", [20, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_int8_prefilter_bounds_its_error(dim: int, dtype: torch.dtype) -> None:
    """The pre-filter is exact only if every approximate similarity is within its slack of the
    exact one: on unit rows, rows of any norm, rows with one dominant coordinate (coarse int8
    steps for the rest), tiny rows and zero (unwritten) rows."""
    generator = torch.Generator().manual_seed(dim)
    unit = torch.nn.functional.normalize(torch.randn(3000, dim, generator=generator), dim=1)
    scaled = unit * torch.rand(3000, 1, generator=generator) * 30
    spiky = unit.clone()
    spiky[:, 0] = 50.0
    tiny = unit * 1e-3
    rows = torch.cat([unit, scaled, spiky, tiny, torch.zeros(5, dim)]).to(dtype)
    queries = torch.cat([
        torch.nn.functional.normalize(torch.randn(40, dim, generator=generator), dim=1),
        rows[3000:3010].float() * 2, rows[6000:6005].float(), torch.zeros(1, dim),
    ])  # fmt: skip
    error, slack = _prefilter_error_and_slack(queries, rows)
    assert (error <= slack).all(), float((error - slack).max())
    # The bound is a bound, not a blanket: for unit rows and queries it stays within 8x the
    # largest error seen (a formula off by a factor of 10 in either direction fails one side).
    unit_error, unit_slack = error[:40, :3000], slack[:40, :3000]
    assert float(unit_slack.max()) < 8 * float(unit_error.max())


def test_an_int8_copy_written_row_by_row_equals_one_built_at_once() -> None:
    from look.search_triton import QuantizedRows

    generator = torch.Generator().manual_seed(3)
    memory = torch.zeros(100, 16, dtype=torch.bfloat16)
    copy = QuantizedRows.from_memory(memory)
    assert float(copy.norm_bound) == 0.0
    rows = (torch.randn(30, 16, generator=generator) * 3).to(torch.bfloat16)
    positions = torch.randperm(100, generator=generator)[:30]
    memory[positions] = rows
    copy.write_(positions, rows)
    whole = QuantizedRows.from_memory(memory)
    assert torch.equal(copy.values, whole.values)
    assert torch.equal(copy.scales, whole.scales) and torch.equal(copy.errors, whole.errors)
    torch.testing.assert_close(copy.norm_bound, whole.norm_bound, rtol=0, atol=0)
    # Overwriting with smaller rows never lowers the bound (a running maximum, no host read).
    copy.write_(positions, rows / 10)
    assert torch.equal(copy.norm_bound, whole.norm_bound)


def test_the_default_config_is_gluons_on_a_hopper_gpu_and_the_triton_passes_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from look import search_gluon, search_triton
    from look.search_triton import HOPPER_CONFIG, KERNEL_CONFIGS, get_kernel_config

    capability = {"value": (9, 0)}
    gluon = {"value": True}
    monkeypatch.setattr(search_triton, "_kernel_config", None)
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda device=None: capability["value"]
    )
    monkeypatch.setattr(search_gluon, "gluon_available", lambda: bool(gluon["value"]))
    gpu = torch.device("cuda", 0)
    try:
        search_triton._hopper_with_gluon.cache_clear()
        assert HOPPER_CONFIG.kernel == "gluon"
        assert get_kernel_config(gpu) is HOPPER_CONFIG
        assert get_kernel_config(torch.device("cpu")) is KERNEL_CONFIGS[0]
        assert get_kernel_config() is KERNEL_CONFIGS[0]
        # After a Gluon pass failed in this process its work goes to the Triton passes: config
        # 0's tiles then.
        monkeypatch.setattr(search_triton._GLUON_FALLBACK, "failed", True)
        assert get_kernel_config(gpu) is KERNEL_CONFIGS[0]
        monkeypatch.setattr(search_triton._GLUON_FALLBACK, "failed", False)
        for capability["value"], gluon["value"] in [((8, 0), True), ((10, 0), True), ((9, 0), 0)]:
            search_triton._hopper_with_gluon.cache_clear()
            assert get_kernel_config(gpu) is KERNEL_CONFIGS[0], (capability, gluon)
        # A Gluon that cannot even be asked (another Triton release) leaves the Triton passes.
        monkeypatch.setattr(search_gluon, "gluon_available", lambda: 1 / 0)
        capability["value"] = (9, 0)
        search_triton._hopper_with_gluon.cache_clear()
        assert get_kernel_config(gpu) is KERNEL_CONFIGS[0]
        # A config set by hand (or by the tuner) holds on every device, until None restores
        # the choice by device.
        search_triton.set_kernel_config(KERNEL_CONFIGS[1])
        assert get_kernel_config(gpu) is get_kernel_config() is KERNEL_CONFIGS[1]
        search_triton.set_kernel_config(None)
        assert get_kernel_config() is KERNEL_CONFIGS[0]
    finally:
        search_triton._hopper_with_gluon.cache_clear()


def test_the_tuner_also_times_the_devices_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """On Hopper the default is the Gluon config, which TUNED_CONFIGS leave out: a tuning that
    timed the Triton configs alone would replace it with a slower one."""
    from look import search_triton
    from look.search import knn_search
    from look.search_triton import HOPPER_CONFIG, TUNED_CONFIGS, tune_kernel_config

    memory = torch.nn.functional.normalize(torch.randn(500, 8), dim=1)
    query = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    exact = knn_search(query, memory, 3, backend="torch")
    timed: list[object] = []

    def search(query, memory, k, *, config):  # type: ignore[no-untyped-def]
        timed.append(config)
        return exact.values, exact.indices, torch.zeros(4, dtype=torch.bool)

    monkeypatch.setattr(search_triton, "fused_knn_search", search)
    monkeypatch.setattr(search_triton, "median_call_ms", lambda call, repeats, device: 1.0)
    monkeypatch.setattr(search_triton, "_device_default_config", lambda device: HOPPER_CONFIG)
    monkeypatch.setattr(search_triton, "_kernel_config", None)
    results = tune_kernel_config(query, memory, 3, repeats=1)
    assert HOPPER_CONFIG in timed and set(TUNED_CONFIGS) <= set(timed)
    assert len(results) == len(TUNED_CONFIGS) + 1
