"""The LOOK loss terms over searched neighbours in two fused GPU kernels (Triton).

Once the search has found each query's ``k`` neighbour rows, the loss needs, per query ``i``, the
similarities ``s_ij = q_i · m_j / τ`` of those rows, ``log Σ_j exp(s_ij)`` over the neighbours and
over the same-label ones, and two counts. In PyTorch that is ~50 small kernels in the forward pass
(gather ``B × k × d`` rows, cast, mask, multiply, sum, two masked log-sum-exps, counts) and ~20 in
the backward pass, plus ``B × k × d`` fp32 temporaries. On a GPU each of those kernels costs a few
microseconds whatever it computes; at ImageNet scale they are a third of what LOOK adds to a
cross-entropy step (docs/results.md). Here one program per query gathers its rows once, keeps
running log-sum-exps and writes its loss and counts; the backward kernel reads the ``k`` rows again
(256 × 200 rows of 128 bf16: 13 MB) and writes the query's gradient.

Values equal the PyTorch path's up to fp32 summation order (tested with Triton's interpreter on
CPU, ``tests/look_terms_triton_cases.py``). Used by :func:`look.losses.look_loss_terms` for a CUDA
memory with fp32 queries and the ``"drop"`` rule; any failure to build or launch the kernels makes
it warn once and use the PyTorch path.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs may lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

__all__ = ["fused_neighbour_terms", "fused_terms_supported", "set_fused_terms_enabled"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Widest feature dimension: a program holds BLOCK_K × next_power_of_two(d) fp32 values.
_MAX_DIM = 1024
_enabled = True
_failed = False


def set_fused_terms_enabled(enabled: bool) -> bool:
    """Switch the fused terms on or off for this process (benchmarks time both); returns the
    previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def fused_terms_supported(queries: Tensor, memory: Tensor) -> bool:
    """Whether :func:`fused_neighbour_terms` serves these inputs: Triton, a CUDA memory (or
    ``TRITON_INTERPRET=1`` with an fp32/fp16 memory: numpy has no bf16), fp32 queries on the
    memory's device, a feature dimension of at most 1,024, and not switched off or failed."""
    if triton is None or not _enabled or _failed:
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
    def _neighbour_logits(
        query,
        row,
        rows_ptr,
        indices_ptr,
        labels_ptr,
        label,
        start,
        k,
        dim,
        temperature,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Logits, rows (fp32) and neighbour/positive masks of neighbours ``start:start+BLOCK_K``
        of query ``row``; ``rows`` is ``(B, k, d)`` and ``labels``/``indices`` ``(B, k)``,
        contiguous."""
        offs_k = start + tl.arange(0, BLOCK_K)
        offs_d = tl.arange(0, BLOCK_D)
        in_range = offs_k < k
        slots = row.to(tl.int64) * k + offs_k
        is_neighbour = tl.load(indices_ptr + slots, mask=in_range, other=-1) >= 0
        rows = tl.load(
            rows_ptr + slots[:, None] * dim + offs_d[None, :],
            mask=is_neighbour[:, None] & (offs_d < dim)[None, :],
            other=0.0,
        ).to(tl.float32)
        logits = tl.sum(rows * query[None, :], axis=1) / temperature
        labels = tl.load(labels_ptr + slots, mask=is_neighbour, other=0)
        is_positive = is_neighbour & (labels == label)
        return logits, rows, is_neighbour, is_positive

    @triton.jit
    def _terms_forward_kernel(
        query_ptr,
        rows_ptr,
        indices_ptr,
        labels_ptr,
        query_labels_ptr,
        loss_ptr,
        log_sums_ptr,
        counts_ptr,
        k,
        dim,
        temperature,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0)
        offs_d = tl.arange(0, BLOCK_D)
        query = tl.load(query_ptr + row * dim + offs_d, mask=offs_d < dim, other=0.0)
        label = tl.load(query_labels_ptr + row)
        neg_inf = float("-inf")
        # Running log-sum-exps (max and scaled sum) over all neighbours and over the positives.
        all_max = tl.full([1], neg_inf, dtype=tl.float32)
        all_sum = tl.zeros([1], dtype=tl.float32)
        positive_max = tl.full([1], neg_inf, dtype=tl.float32)
        positive_sum = tl.zeros([1], dtype=tl.float32)
        neighbours = tl.zeros([1], dtype=tl.int32)
        positives = tl.zeros([1], dtype=tl.int32)
        for start in range(0, k, BLOCK_K):
            logits, _rows, is_neighbour, is_positive = _neighbour_logits(
                query, row, rows_ptr, indices_ptr, labels_ptr, label, start, k, dim, temperature,
                BLOCK_K, BLOCK_D,
            )  # fmt: skip
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
        log_all = all_max + tl.log(all_sum)
        valid = positives > 0
        # (log(1) for a query without a positive: its value is never used)
        log_positive = positive_max + tl.log(tl.where(valid, positive_sum, 1.0))
        # No positive: loss exactly 0 (the query leaves the mean), as in the PyTorch path.
        loss = tl.where(valid, log_all - tl.where(valid, log_positive, 0.0), 0.0)
        one = tl.arange(0, 1)
        tl.store(loss_ptr + row + one, loss)
        tl.store(log_sums_ptr + 2 * row + one, log_all)
        tl.store(log_sums_ptr + 2 * row + 1 + one, log_positive)
        tl.store(counts_ptr + 2 * row + one, neighbours)
        tl.store(counts_ptr + 2 * row + 1 + one, positives)

    @triton.jit
    def _terms_backward_kernel(
        query_ptr,
        rows_ptr,
        indices_ptr,
        labels_ptr,
        query_labels_ptr,
        grad_loss_ptr,
        log_sums_ptr,
        counts_ptr,
        grad_query_ptr,
        k,
        dim,
        temperature,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < dim
        query = tl.load(query_ptr + row * dim + offs_d, mask=d_mask, other=0.0)
        label = tl.load(query_labels_ptr + row)
        log_all = tl.load(log_sums_ptr + 2 * row)
        log_positive = tl.load(log_sums_ptr + 2 * row + 1)
        valid = tl.load(counts_ptr + 2 * row + 1) > 0
        # loss = log_all − log_positive where valid, else the constant 0.
        grad = tl.where(valid, tl.load(grad_loss_ptr + row), 0.0)
        accumulated = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, k, BLOCK_K):
            logits, rows, is_neighbour, is_positive = _neighbour_logits(
                query, row, rows_ptr, indices_ptr, labels_ptr, label, start, k, dim, temperature,
                BLOCK_K, BLOCK_D,
            )  # fmt: skip
            # d log Σ exp / d logit is the softmax over the masked entries; where() (not a
            # product) keeps the exp of a masked entry from turning into NaN.
            weights = tl.where(is_neighbour, tl.exp(logits - log_all), 0.0) - tl.where(
                is_positive, tl.exp(logits - log_positive), 0.0
            )
            accumulated += tl.sum(weights[:, None] * rows, axis=0)
        tl.store(grad_query_ptr + row * dim + offs_d, accumulated * grad / temperature,
                 mask=d_mask)  # fmt: skip


def _blocks(dim: int) -> tuple[int, int]:
    block_d = max(16, 1 << (dim - 1).bit_length())
    return max(16, min(64, 8192 // block_d)), block_d


def _torch_gradient(
    queries: Tensor,
    rows: Tensor,
    indices: Tensor,
    labels: Tensor,
    query_labels: Tensor,
    grad_loss: Tensor,
    log_sums: Tensor,
    counts: Tensor,
    temperature: float,
) -> Tensor:
    """What the backward kernel computes, in PyTorch (used if that kernel fails to launch)."""
    is_neighbour = indices >= 0
    rows = rows.float().masked_fill(~is_neighbour.unsqueeze(-1), 0.0)  # (B, k, d)
    logits = torch.einsum("bkd,bd->bk", rows, queries) / temperature
    is_positive = is_neighbour & (labels == query_labels.unsqueeze(1))
    weights = torch.where(is_neighbour, torch.exp(logits - log_sums[:, :1]), 0.0) - torch.where(
        is_positive, torch.exp(logits - log_sums[:, 1:]), 0.0
    )
    grad = torch.where(counts[:, 1] > 0, grad_loss, 0.0)
    return torch.einsum("bk,bkd->bd", weights, rows) * (grad / temperature).unsqueeze(1)


class _FusedNeighbourTerms(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        queries: Tensor,
        rows: Tensor,
        indices: Tensor,
        labels: Tensor,
        query_labels: Tensor,
        temperature: float,
    ) -> tuple[Tensor, Tensor]:
        batch, dim = queries.shape
        loss = torch.empty(batch, dtype=torch.float32, device=queries.device)
        log_sums = torch.empty(batch, 2, dtype=torch.float32, device=queries.device)
        counts = torch.empty(batch, 2, dtype=torch.int32, device=queries.device)
        block_k, block_d = _blocks(dim)
        _terms_forward_kernel[(batch,)](
            queries, rows, indices, labels, query_labels, loss, log_sums, counts,
            indices.shape[1], dim, temperature, BLOCK_K=block_k, BLOCK_D=block_d,
        )  # fmt: skip
        ctx.save_for_backward(queries, rows, indices, labels, query_labels, log_sums, counts)
        ctx.temperature = temperature  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(counts)
        return loss, counts

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor, _grad_counts: Tensor
    ) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors  # type: ignore[attr-defined]
        queries, rows, indices, labels, query_labels, log_sums, counts = saved
        temperature = ctx.temperature  # type: ignore[attr-defined]
        grad_loss = grad_loss.contiguous().float()
        batch, dim = queries.shape
        grad_queries = torch.empty_like(queries)
        block_k, block_d = _blocks(dim)
        try:
            _terms_backward_kernel[(batch,)](
                queries, rows, indices, labels, query_labels, grad_loss, log_sums, counts,
                grad_queries, indices.shape[1], dim, temperature, BLOCK_K=block_k,
                BLOCK_D=block_d,
            )  # fmt: skip
        except Exception as error:  # the forward kernel built, so this is unlikely: stay exact
            _disable(error)
            grad_queries = _torch_gradient(
                queries, rows, indices, labels, query_labels, grad_loss, log_sums, counts,
                temperature,
            )  # fmt: skip
        return grad_queries, None, None, None, None, None


def _disable(error: Exception) -> None:
    global _failed
    _failed = True
    warnings.warn(
        f"the fused Triton LOOK loss terms failed ({type(error).__name__}: {error}); "
        "computing them with PyTorch for the rest of this process",
        RuntimeWarning,
        stacklevel=3,
    )


def fused_neighbour_terms(
    queries: Tensor,
    memory: Tensor,
    indices: Tensor,
    query_labels: Tensor,
    memory_labels: Tensor,
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(loss, neighbour_count, positive_count)`` per query (counts int64), or None if the kernel
    could not run (it then warns once and is not tried again in this process).

    ``loss[i] = log Σ_j exp(s_ij/τ) − log Σ_{j positive} exp(s_ij/τ)`` over the rows
    ``indices[i]`` (``-1``: padding) with ``s_ij = queries[i] · memory[j]`` in fp32, positive
    meaning ``memory_labels[j] == query_labels[i]``; exactly 0 for a query without a positive.
    Differentiable in ``queries`` (fp32, :func:`fused_terms_supported`); the memory is a constant.
    """
    if queries.shape[0] == 0:  # a grid of zero programs is not launchable
        counts = torch.zeros(0, dtype=torch.int64, device=queries.device)
        return queries.sum(dim=1) * 0, counts, counts.clone()
    # Copies of the neighbours' rows (in the memory's dtype) and labels: the memory may be
    # written in place before the backward pass, which must see the rows the forward pass saw.
    safe = indices.clamp(min=0)
    rows = memory.detach()[safe]  # (B, k, d)
    labels = memory_labels[safe]
    try:
        loss, counts = _FusedNeighbourTerms.apply(
            queries.contiguous(), rows, indices.contiguous(), labels,
            query_labels.contiguous(), temperature,
        )  # fmt: skip
    except Exception as error:  # any compile or launch failure
        _disable(error)
        return None
    counts = counts.long()
    return loss, counts[:, 0], counts[:, 1]


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
    rows = torch.empty(batch, k, dim, dtype=dtype, device=meta)
    indices = torch.empty(batch, k, dtype=torch.int64, device=meta)
    labels, query_labels = indices.clone(), torch.empty(batch, dtype=torch.int64, device=meta)
    per_query = torch.empty(batch, device=meta)
    pairs = torch.empty(batch, 2, device=meta)
    counts = torch.empty(batch, 2, dtype=torch.int32, device=meta)
    block_k, block_d = _blocks(dim)
    constexprs: dict[str, object] = {"BLOCK_K": block_k, "BLOCK_D": block_d}
    forward = compile_for_capability(
        _terms_forward_kernel,
        (queries, rows, indices, labels, query_labels, per_query, pairs, counts, k, dim, 0.1),
        constexprs, capability, num_warps=4, num_stages=3,
    )  # fmt: skip
    backward = compile_for_capability(
        _terms_backward_kernel,
        (queries, rows, indices, labels, query_labels, per_query, pairs, counts, queries, k, dim,
         0.1),
        constexprs, capability, num_warps=4, num_stages=3,
    )  # fmt: skip
    return forward, backward
