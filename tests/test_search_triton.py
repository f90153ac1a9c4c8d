"""The fused Triton search against the PyTorch scan (CPU, Triton's interpreter) and its dispatch."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from look.search import knn_search
from look.search_triton import fused_search_supported, triton_available

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_fused_search_equals_scan_in_triton_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}
    completed = subprocess.run(
        [sys.executable, "-m", "tests.search_triton_cases"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout.count(": ok") == 20, completed.stdout


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
    monkeypatch.setattr(search_module, "_fused_search_failed", False)
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
