"""The fused LOOK loss terms on a real GPU (skipped without CUDA): the same terms and gradients
as the PyTorch path for a bf16 bank at a training step's size."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from look.losses import look_loss_terms
from look.losses.look_terms_triton import fused_terms_enabled, fused_terms_supported
from look.search_triton import triton_available

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and Triton"
)


@pytest.mark.parametrize("memory_dtype", [torch.bfloat16, torch.float32])
def test_fused_terms_equal_the_pytorch_terms_on_gpu(
    memory_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    rows, batch, dim, k = 200_000, 256, 128, 200
    memory = F.normalize(torch.randn(rows, dim, device="cuda", generator=generator), dim=1)
    memory = memory.to(memory_dtype)
    labels = torch.randint(0, 100, (rows,), device="cuda", generator=generator)
    query = F.normalize(torch.randn(batch, dim, device="cuda", generator=generator), dim=1)
    query_labels = torch.randint(0, 100, (batch,), device="cuda", generator=generator)
    ids = torch.randint(0, rows, (batch,), device="cuda", generator=generator)
    assert fused_terms_supported(query, memory)
    module = importlib.import_module("look.losses.look_loss")
    calls = []
    original = module.fused_neighbour_terms
    monkeypatch.setattr(
        module, "fused_neighbour_terms", lambda *a, **kw: calls.append(1) or original(*a, **kw)
    )
    results = {}
    for fused in (True, False):
        with fused_terms_enabled(fused):
            leaf = query.clone().requires_grad_(True)
            terms = look_loss_terms(
                leaf, query_labels, memory, labels, k=k, temperature=0.1, query_indices=ids
            )
            (grad,) = torch.autograd.grad(terms.loss.sum() / terms.valid.sum(), leaf)
            results[fused] = terms, grad
    assert len(calls) == 1  # the fused run only
    (fused_terms, fused_grad), (torch_terms, torch_grad) = results[True], results[False]
    assert torch.equal(fused_terms.valid, torch_terms.valid)
    # (same search twice; its atomic collect may order tied candidates differently)
    assert torch.equal(
        fused_terms.neighbour_indices.sort(dim=1).values,
        torch_terms.neighbour_indices.sort(dim=1).values,
    )
    torch.testing.assert_close(fused_terms.loss, torch_terms.loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        fused_terms.neighbour_agreement, torch_terms.neighbour_agreement, rtol=0, atol=1e-7
    )
    torch.testing.assert_close(fused_grad, torch_grad, rtol=1e-4, atol=1e-6)
