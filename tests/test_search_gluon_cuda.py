"""The Gluon passes on a Hopper GPU (skipped elsewhere): the same neighbours as the PyTorch scan
and the Triton passes, with the Gluon kernels themselves having run (not the Triton passes they
fall back to).

Its own file so that ``benchmarks/gpu_session.sh`` runs it under its own time limit: a kernel
whose barriers deadlock would hang here, not in the other CUDA tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import look.search_triton as search_triton
from look import search_gluon
from look.search import KnnResult, knn_search
from look.search_gluon import gluon_available
from look.search_triton import KERNEL_CONFIGS, SearchKernelConfig, fused_knn_search
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


@pytest.mark.parametrize("config", GLUON_CONFIGS, ids=lambda config: "-")
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
