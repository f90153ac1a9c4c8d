"""The fused Triton search on a real GPU (skipped without CUDA): equal to the PyTorch scan, at
sizes that exercise the sampled bound, the collect pass and the overflow fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from look.losses import look_loss_terms
from look.search import KnnResult, knn_search
from look.search_triton import QuantizedRows, fused_search_supported, triton_available
from tests.neighbour_checks import assert_same_neighbours

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and Triton"
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("batch", "rows", "dim", "k"), [(256, 300_000, 128, 200), (50, 70_000, 96, 20)]
)
def test_fused_equals_scan_on_gpu(
    dtype: torch.dtype, batch: int, rows: int, dim: int, k: int
) -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    memory = F.normalize(torch.randn(rows, dim, device="cuda", generator=generator), dim=1)
    memory = memory.to(dtype)
    query = F.normalize(torch.randn(batch, dim, device="cuda", generator=generator), dim=1)
    valid = torch.rand(rows, device="cuda", generator=generator) > 0.05
    ids = torch.randint(0, rows, (batch,), device="cuda", generator=generator)
    assert fused_search_supported(query, memory, memory_ids=None)
    fused = knn_search(query, memory, k, query_ids=ids, memory_valid=valid, backend="triton")
    scan = knn_search(query, memory, k, query_ids=ids, memory_valid=valid, backend="torch")
    assert_same_neighbours(fused, scan, atol=1e-5)
    # Reading the int8 copy: the same neighbours (int8 tensor-core products, exact re-score).
    int8 = knn_search(query, memory, k, query_ids=ids, memory_valid=valid, backend="triton",
                      prefilter=QuantizedRows.from_memory(memory))  # fmt: skip
    assert_same_neighbours(int8, scan, atol=1e-5)


def test_overflow_falls_back_on_gpu() -> None:
    row = F.normalize(torch.randn(1, 64, device="cuda"), dim=1)
    memory = torch.cat(
        [row.repeat(5000, 1), F.normalize(torch.randn(200_000, 64, device="cuda"), dim=1)]
    )
    memory = memory.bfloat16()
    query = row + 0.01 * torch.randn(8, 64, device="cuda")
    fused = knn_search(query, memory, 10, backend="triton")
    assert bool((fused.indices < 5000).all())


def test_look_loss_same_with_either_backend() -> None:
    memory = F.normalize(torch.randn(100_000, 128, device="cuda"), dim=1).bfloat16()
    labels = torch.randint(0, 100, (100_000,), device="cuda")
    query = F.normalize(torch.randn(128, 128, device="cuda", requires_grad=True), dim=1)
    query_labels = torch.randint(0, 100, (128,), device="cuda")
    ids = torch.randint(0, 100_000, (128,), device="cuda")
    fused = look_loss_terms(
        query, query_labels, memory, labels, k=200, temperature=0.1, query_indices=ids
    )
    scan = look_loss_terms(
        query, query_labels, memory, labels, k=200, temperature=0.1, query_indices=ids,
        search_backend="torch",
    )  # fmt: skip
    torch.testing.assert_close(fused.loss, scan.loss, rtol=1e-5, atol=1e-5)


def test_a_cuda_banks_int8_copy_is_written_by_its_kernel_as_pytorch_would() -> None:
    from look.memory import MemoryBank

    bank = MemoryBank(50_000, 128, momentum=0.5, dtype="bf16", int8_prefilter=True).cuda()
    ids = torch.randint(0, 50_000, (4096,), device="cuda")
    bank.update(ids, torch.randn(4096, 128, device="cuda"), torch.zeros_like(ids))
    copy = bank.search_prefilter()  # built from the rows
    for _ in range(3):  # then written by the kernel, with momentum and repeated ids
        ids = torch.randint(0, 50_000, (4096,), device="cuda")
        bank.update(ids, torch.randn(4096, 128, device="cuda"), torch.zeros_like(ids))
    assert bank.search_prefilter() is copy
    values, scales, errors = QuantizedRows.quantize(bank.features)
    assert torch.equal(copy.values, values) and torch.equal(copy.scales, scales)
    # The kernel sums the error's squares in another order: fp32 over 128 dimensions, within
    # ~128 ulp (1.7e-6 relative seen on an H200), far inside the 2**-8 margin both carry.
    torch.testing.assert_close(copy.errors, errors, rtol=1e-5, atol=0)


@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8-copy"])
def test_replayed_searches_find_what_eager_ones_do(
    int8: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """set_graph_replay on a GPU: one recording per key, replayed for new queries and ids, reading
    the memory's (and its int8 copy's) rows as they are at each replay; a result stays as it
    was after later replays; the same neighbours as the scan each time."""
    import look.search_triton as search_triton

    recordings: list[int] = []
    record = search_triton._record_cuda_graph

    def counted(run, device):  # type: ignore[no-untyped-def]
        recordings.append(1)
        return record(run, device)

    monkeypatch.setattr(search_triton, "_record_cuda_graph", counted)
    monkeypatch.setattr(search_triton._GRAPH_FALLBACK, "failed", False)
    generator = torch.Generator(device="cuda").manual_seed(3)
    rows = 300_000
    memory = F.normalize(torch.randn(rows, 128, device="cuda", generator=generator), dim=1)
    memory = memory.bfloat16()
    copy = QuantizedRows.from_memory(memory) if int8 else None
    valid = torch.rand(rows, device="cuda", generator=generator) > 0.05
    search_triton.set_graph_replay(True)
    try:
        kept = []
        for _ in range(4):
            query = F.normalize(torch.randn(256, 128, device="cuda", generator=generator), dim=1)
            ids = torch.randint(0, rows, (256,), device="cuda", generator=generator)
            values, indices, overflowed = search_triton.fused_knn_search(
                query, memory, 200, query_ids=ids, memory_valid=valid, prefilter=copy
            )
            scan = knn_search(query, memory, 200, query_ids=ids, memory_valid=valid,
                              backend="torch")  # fmt: skip
            assert not bool(overflowed.any())
            assert_same_neighbours(KnnResult(values, indices), scan, atol=1e-5)
            kept.append((KnnResult(values, indices), scan))
            # The next search reads rows written since: near-copies of this step's queries.
            positions = torch.randint(0, rows, (256,), device="cuda", generator=generator)
            near = F.normalize(query + 0.01 * torch.randn_like(query), dim=1).bfloat16()
            memory[positions] = near
            if copy is not None:
                copy.write_(positions, near)
        assert not search_triton._GRAPH_FALLBACK.failed, "recording failed: searches ran eagerly"
        assert len(recordings) == 1
        for result, scan in kept:  # each result as it was returned
            assert_same_neighbours(result, scan, atol=1e-5)
    finally:
        search_triton.set_graph_replay(False)
