"""The LOOK loss terms over searched neighbours in two fused GPU kernels (Triton).

Once the search has found each query's ``k`` neighbour rows, the loss needs, per query ``i``, the
similarities ``s_ij = q_i · m_j / τ`` of those rows, ``log Σ_j exp(s_ij)`` over the neighbours and
over the same-label ones, and two counts. In PyTorch that is ~35 small kernels in the forward pass
(gather ``B × k × d`` rows, cast, mask, multiply, sum, two masked log-sum-exps, counts, the NaN
mark) and ~14 in the backward pass (``benchmarks/look_step_ops.py``), plus ``B × k × d`` fp32
temporaries. On a GPU each kernel costs a few microseconds whatever it computes; session 8's H100
traces put ~0.5 ms of what LOOK adds to a cross-entropy step in ~150 such kernels
(docs/results.md). Here one program per query gathers its rows once (copying them, and their
labels, for the backward pass), keeps running log-sum-exps and writes its loss, validity and
neighbour agreement; the backward kernel reads the copies again (256 × 200 rows of 128 bf16:
13 MB) and writes the query's gradient.

Values equal the PyTorch path's up to fp32 summation order (tested with Triton's interpreter on
CPU, ``tests/look_terms_triton_cases.py``). Used by :func:`look.losses.look_loss_terms` for a CUDA
memory with fp32 queries and the ``"drop"`` rule; any failure to build or launch the kernels makes
it warn once and use the PyTorch path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import Tensor

from look.kernel_fallback import KernelFallback

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs may lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

__all__ = [
    "compile_terms_kernels",
    "fused_neighbour_terms",
    "fused_terms_enabled",
    "fused_terms_supported",
]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Widest feature dimension: a program holds BLOCK_K × next_power_of_two(d) fp32 values.
_MAX_DIM = 1024
_enabled = True
_FALLBACK = KernelFallback(
    "the fused Triton LOOK loss terms", "computing them with PyTorch for the rest of this process"
)


@contextlib.contextmanager
def fused_terms_enabled(enabled: bool) -> Iterator[None]:
    """Within the block, the fused terms are on or off for this process (benchmarks and tests
    time or compare both); the setting before it is restored after it."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = previous


def fused_terms_supported(queries: Tensor, memory: Tensor) -> bool:
    """Whether :func:`fused_neighbour_terms` serves these inputs: Triton, a CUDA memory (or
    ``TRITON_INTERPRET=1`` with an fp32/fp16 memory: numpy has no bf16), fp32 queries on the
    memory's device, a feature dimension of at most 1,024, and not switched off or failed."""
    if triton is None or not _enabled or _FALLBACK.failed:
        return False
    if queries.dtype != torch.float32 or queries.device != memory.device:
        return False
    if memory.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if queries.dim() != 2 or not 0 < queries.shape[1] <= _MAX_DIM:
        return False
    if memory.is_cuda:
        return True
    return _INTERPRET and memory.dtype != torch.bfloat16


if triton is not None:

    @triton.jit
    def _this_query(query_ptr, query_labels_ptr, dim, BLOCK_D: tl.constexpr):
        """This program's query: its row, the feature offsets and mask, the vector, the label."""
        row = tl.program_id(0)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < dim
        query = tl.load(query_ptr + row * dim + offs_d, mask=d_mask, other=0.0)
        return row, offs_d, d_mask, query, tl.load(query_labels_ptr + row)

    @triton.jit
    def _is_finite(query):
        """Whether every entry of the query vector is finite (masked lanes hold 0)."""
        return tl.min((tl.abs(query) < float("inf")).to(tl.int32), axis=0) > 0

    @triton.jit
    def _terms_forward_kernel(
        query_ptr,
        memory_ptr,
        memory_labels_ptr,
        indices_ptr,
        query_labels_ptr,
        rows_copy_ptr,
        labels_copy_ptr,
        loss_ptr,
        agreement_ptr,
        valid_ptr,
        log_sums_ptr,
        k,
        dim,
        stride_memory,
        temperature,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        row, offs_d, d_mask, query, label = _this_query(query_ptr, query_labels_ptr, dim, BLOCK_D)
        neg_inf = float("-inf")
        # Running log-sum-exps (max and scaled sum) over all neighbours and over the positives.
        all_max = tl.full([1], neg_inf, dtype=tl.float32)
        all_sum = tl.zeros([1], dtype=tl.float32)
        positive_max = tl.full([1], neg_inf, dtype=tl.float32)
        positive_sum = tl.zeros([1], dtype=tl.float32)
        neighbours = tl.zeros([1], dtype=tl.int32)
        positives = tl.zeros([1], dtype=tl.int32)
        for start in range(0, k, BLOCK_K):
            offs_k = start + tl.arange(0, BLOCK_K)
            slots = row.to(tl.int64) * k + offs_k
            indices = tl.load(indices_ptr + slots, mask=offs_k < k, other=-1)
            is_neighbour = indices >= 0
            safe = tl.where(is_neighbour, indices, 0).to(tl.int64)
            row_mask = is_neighbour[:, None] & d_mask[None, :]
            rows = tl.load(
                memory_ptr + safe[:, None] * stride_memory + offs_d[None, :], mask=row_mask,
                other=0.0,
            )  # fmt: skip
            labels = tl.load(memory_labels_ptr + safe, mask=is_neighbour, other=0)
            # The backward pass reads these copies: the memory may be rewritten before it.
            tl.store(rows_copy_ptr + slots[:, None] * dim + offs_d[None, :], rows, mask=row_mask)
            tl.store(labels_copy_ptr + slots, labels, mask=is_neighbour)
            logits = tl.sum(rows.to(tl.float32) * query[None, :], axis=1) / temperature
            is_positive = is_neighbour & (labels == label)
            neighbours += tl.sum(is_neighbour.to(tl.int32), axis=0)
            positives += tl.sum(is_positive.to(tl.int32), axis=0)
            # A max still at -inf (nothing seen yet) shifts by 0: exp(-inf - 0) = 0 keeps the sum.
            new_max = tl.maximum(all_max, tl.max(tl.where(is_neighbour, logits, neg_inf), axis=0))
            shift = tl.where(new_max == neg_inf, 0.0, new_max)
            all_sum = all_sum * tl.exp(all_max - shift) + tl.sum(
                tl.where(is_neighbour, tl.exp(logits - shift), 0.0), axis=0
            )
            all_max = new_max
            new_max = tl.maximum(
                positive_max, tl.max(tl.where(is_positive, logits, neg_inf), axis=0)
            )
            shift = tl.where(new_max == neg_inf, 0.0, new_max)
            positive_sum = positive_sum * tl.exp(positive_max - shift) + tl.sum(
                tl.where(is_positive, tl.exp(logits - shift), 0.0), axis=0
            )
            positive_max = new_max
        has_neighbour = neighbours > 0
        has_positive = positives > 0
        # -inf where there is none (log(1) keeps log(0) out of the interpreter's numpy).
        log_all = tl.where(has_neighbour, all_max + tl.log(tl.where(has_neighbour, all_sum, 1.0)),
                           neg_inf)  # fmt: skip
        log_positive = tl.where(
            has_positive, positive_max + tl.log(tl.where(has_positive, positive_sum, 1.0)), neg_inf
        )
        # No positive: loss exactly 0 (the query leaves the mean). A non-finite query (a diverged
        # encoder) gets a NaN loss that counts, so that the mean is NaN and the trainer's loss
        # check sees it without a host read here.
        loss = tl.where(has_positive, log_all - tl.where(has_positive, log_positive, 0.0), 0.0)
        finite = _is_finite(query)
        loss = tl.where(finite, loss, float("nan"))
        agreement = positives.to(tl.float32) / tl.maximum(neighbours, 1).to(tl.float32)
        one = tl.arange(0, 1)
        tl.store(loss_ptr + row + one, loss)
        tl.store(agreement_ptr + row + one, agreement)
        tl.store(valid_ptr + row + one, (has_positive | ~finite).to(tl.uint8))
        tl.store(log_sums_ptr + 2 * row + one, log_all)
        tl.store(log_sums_ptr + 2 * row + 1 + one, log_positive)

    @triton.jit
    def _terms_backward_kernel(
        query_ptr,
        rows_copy_ptr,
        labels_copy_ptr,
        indices_ptr,
        query_labels_ptr,
        grad_loss_ptr,
        log_sums_ptr,
        grad_query_ptr,
        k,
        dim,
        temperature,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        row, offs_d, d_mask, query, label = _this_query(query_ptr, query_labels_ptr, dim, BLOCK_D)
        log_all = tl.load(log_sums_ptr + 2 * row)
        log_positive = tl.load(log_sums_ptr + 2 * row + 1)
        # loss = log_all − log_positive for a finite query with a positive (log_positive > -inf),
        # else a constant (0, or NaN for a non-finite query): no gradient.
        trained = (log_positive > float("-inf")) & _is_finite(query)
        grad = tl.load(grad_loss_ptr + row)
        accumulated = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, k, BLOCK_K):
            offs_k = start + tl.arange(0, BLOCK_K)
            slots = row.to(tl.int64) * k + offs_k
            is_neighbour = tl.load(indices_ptr + slots, mask=offs_k < k, other=-1) >= 0
            rows = tl.load(
                rows_copy_ptr + slots[:, None] * dim + offs_d[None, :],
                mask=is_neighbour[:, None] & d_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            labels = tl.load(labels_copy_ptr + slots, mask=is_neighbour, other=0)
            is_positive = is_neighbour & (labels == label)
            logits = tl.sum(rows * query[None, :], axis=1) / temperature
            # d log Σ exp / d logit is the softmax over the masked entries; where() (not a
            # product) keeps the exp of a masked entry from turning into NaN.
            weights = tl.where(is_neighbour, tl.exp(logits - log_all), 0.0) - tl.where(
                is_positive, tl.exp(logits - log_positive), 0.0
            )
            accumulated += tl.sum(weights[:, None] * rows, axis=0)
        # (where(), not a product with 0: a NaN query's sums are NaN)
        tl.store(grad_query_ptr + row * dim + offs_d,
                 tl.where(trained, accumulated * grad / temperature, 0.0), mask=d_mask)  # fmt: skip


def _blocks(dim: int) -> tuple[int, int]:
    block_d = max(16, 1 << (dim - 1).bit_length())
    return max(16, min(64, 8192 // block_d)), block_d


def _torch_gradient(
    queries: Tensor,
    rows: Tensor,
    labels: Tensor,
    indices: Tensor,
    query_labels: Tensor,
    grad_loss: Tensor,
    log_sums: Tensor,
    temperature: float,
) -> Tensor:
    """What the backward kernel computes, in PyTorch (used if that kernel fails to launch)."""
    is_neighbour = indices >= 0
    rows = torch.where(is_neighbour.unsqueeze(-1), rows.float(), 0.0)  # (B, k, d)
    logits = torch.einsum("bkd,bd->bk", rows, queries) / temperature
    is_positive = is_neighbour & (labels == query_labels.unsqueeze(1))
    weights = torch.where(is_neighbour, torch.exp(logits - log_sums[:, :1]), 0.0) - torch.where(
        is_positive, torch.exp(logits - log_sums[:, 1:]), 0.0
    )
    trained = (log_sums[:, 1] > float("-inf")) & torch.isfinite(queries).all(dim=1)
    grad = torch.einsum("bk,bkd->bd", weights, rows) * (grad_loss / temperature).unsqueeze(1)
    return torch.where(trained.unsqueeze(1), grad, 0.0)


class _FusedNeighbourTerms(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        queries: Tensor,
        memory: Tensor,
        memory_labels: Tensor,
        indices: Tensor,
        query_labels: Tensor,
        temperature: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        batch, dim = queries.shape
        k = indices.shape[1]
        device = queries.device
        # Unwritten slots (padding) of the copies are never read.
        rows = torch.empty(batch, k, dim, dtype=memory.dtype, device=device)
        labels = torch.empty(batch, k, dtype=memory_labels.dtype, device=device)
        loss = torch.empty(batch, dtype=torch.float32, device=device)
        agreement = torch.empty(batch, dtype=torch.float32, device=device)
        # Bytes, viewed as bool after the kernel (no copy): a store through a bool pointer has
        # had its own rules across Triton versions.
        valid = torch.empty(batch, dtype=torch.uint8, device=device)
        log_sums = torch.empty(batch, 2, dtype=torch.float32, device=device)
        block_k, block_d = _blocks(dim)
        _terms_forward_kernel[(batch,)](
            queries, memory, memory_labels, indices, query_labels, rows, labels, loss, agreement,
            valid, log_sums, k, dim, memory.stride(0), temperature, BLOCK_K=block_k,
            BLOCK_D=block_d,
        )  # fmt: skip
        ctx.save_for_backward(queries, rows, labels, indices, query_labels, log_sums)
        ctx.set_materialize_grads(False)  # no zero gradients made for valid and agreement
        ctx.temperature = temperature  # type: ignore[attr-defined]
        valid = valid.view(torch.bool)
        ctx.mark_non_differentiable(valid, agreement)
        return loss, valid, agreement

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor, *_grad_others: Tensor
    ) -> tuple[Tensor | None, ...]:
        queries, rows, labels, indices, query_labels, log_sums = ctx.saved_tensors  # type: ignore[attr-defined]
        temperature = ctx.temperature  # type: ignore[attr-defined]
        if grad_loss is None:  # (only valid or agreement reached the result)
            return None, None, None, None, None, None
        grad_loss = grad_loss.contiguous().float()
        batch, dim = queries.shape
        grad_queries = torch.empty_like(queries)
        block_k, block_d = _blocks(dim)
        try:
            _terms_backward_kernel[(batch,)](
                queries, rows, labels, indices, query_labels, grad_loss, log_sums, grad_queries,
                indices.shape[1], dim, temperature, BLOCK_K=block_k, BLOCK_D=block_d,
            )  # fmt: skip
        except Exception as error:  # the forward kernel built, so this is unlikely: stay exact
            _FALLBACK.fail(error)
            grad_queries = _torch_gradient(
                queries, rows, labels, indices, query_labels, grad_loss, log_sums, temperature
            )
        return grad_queries, None, None, None, None, None


def fused_neighbour_terms(
    queries: Tensor,
    memory: Tensor,
    indices: Tensor,
    query_labels: Tensor,
    memory_labels: Tensor,
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(loss, valid, agreement)`` per query, or None if the kernel could not run (it then
    warns once and is not tried again in this process).

    ``loss[i] = log Σ_j exp(s_ij/τ) − log Σ_{j positive} exp(s_ij/τ)`` over the rows
    ``indices[i]`` (``-1``: padding) with ``s_ij = queries[i] · memory[j]`` in fp32, positive
    meaning ``memory_labels[j] == query_labels[i]``; exactly 0 and not ``valid`` for a query
    without a positive; NaN and ``valid`` for a non-finite query (as
    :func:`look.losses.look_loss.mark_non_finite_queries` marks it). ``agreement`` is the
    fraction of positives among the neighbours (0 without neighbours). Differentiable in
    ``queries`` (fp32, :func:`fused_terms_supported`); the memory is a constant, and the rows
    the forward pass read are copied for the backward pass.
    """
    if queries.shape[0] == 0:  # a grid of zero programs is not launchable
        valid = torch.zeros(0, dtype=torch.bool, device=queries.device)
        return queries.sum(dim=1) * 0, valid, queries.new_zeros(0)
    if memory.stride(1) != 1:
        memory = memory.contiguous()
    try:
        return _FusedNeighbourTerms.apply(  # type: ignore[no-any-return]
            queries.contiguous(), memory.detach(), memory_labels.contiguous(),
            indices.contiguous(), query_labels.contiguous(), temperature,
        )  # fmt: skip
    except Exception as error:  # any compile or launch failure
        _FALLBACK.fail(error)
        return None


def compile_terms_kernels(
    capability: int, *, dim: int = 128, batch: int = 256, k: int = 200, memory_dtype: str = "bf16"
) -> tuple[object, object]:
    """Compile the forward and the backward kernel for CUDA compute capability ``capability``
    without a GPU, with the arguments a ``batch × k`` call over ``dim``-d rows passes (for CI and
    ``benchmarks/kernel_resources.py``); raises if the compiler rejects them."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    from look.search_triton import compile_for_capability

    meta = torch.device("meta")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[memory_dtype]
    queries = torch.empty(batch, dim, device=meta)
    memory = torch.empty(1_281_167, dim, dtype=dtype, device=meta)
    memory_labels = torch.empty(1_281_167, dtype=torch.int64, device=meta)
    indices = torch.empty(batch, k, dtype=torch.int64, device=meta)
    query_labels = torch.empty(batch, dtype=torch.int64, device=meta)
    rows = torch.empty(batch, k, dim, dtype=dtype, device=meta)
    per_query = torch.empty(batch, device=meta)
    valid = torch.empty(batch, dtype=torch.uint8, device=meta)
    log_sums = torch.empty(batch, 2, device=meta)
    block_k, block_d = _blocks(dim)
    constexprs: dict[str, object] = {"BLOCK_K": block_k, "BLOCK_D": block_d}
    forward = compile_for_capability(
        _terms_forward_kernel,
        (queries, memory, memory_labels, indices, query_labels, rows, indices, per_query,
         per_query, valid, log_sums, k, dim, dim, 0.1),
        constexprs, capability, num_warps=4, num_stages=3,
    )  # fmt: skip
    backward = compile_for_capability(
        _terms_backward_kernel,
        (queries, rows, indices, indices, query_labels, per_query, log_sums, queries, k, dim, 0.1),
        constexprs, capability, num_warps=4, num_stages=3,
    )  # fmt: skip
    return forward, backward
