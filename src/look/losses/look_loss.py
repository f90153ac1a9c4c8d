"""LOOK loss: leave-one-out k-nearest-neighbour classification loss over a feature memory.

For query ``i`` with embedding ``q_i`` and label ``y_i``, ``N_k(i)`` are the ``k`` memory rows with the
largest ``s_ij = q_i · m_j`` among its candidates (its own row and invalid rows excluded), and

    p_i = Σ_{j∈N_k(i), y_j=y_i} exp(s_ij/τ) / Σ_{j∈N_k(i)} exp(s_ij/τ),    loss_i = −log p_i.

The memory is a detached constant: gradients reach the query only, through the selected
similarities, which are recomputed with grad after a no-grad search (the top-k selection itself is
not differentiated). ``k=None`` uses every candidate row, which is NCA.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from look.host_sync import host_reads_are_free
from look.losses.look_terms_triton import fused_neighbour_terms, fused_terms_supported
from look.search import (
    KnnResult,
    SearchBackend,
    autocast_disabled,
    check_positive_int,
    check_search_backend,
    compute_dtype_for,
    exclude_same_ids_,
    knn_search_deferred,
    nearest_positive,
    validate_search_inputs,
    widen_integer_ids,
)
from look.search_triton import QuantizedRows

__all__ = [
    "NO_POSITIVE_RULES",
    "LookLoss",
    "LookLossTerms",
    "NotUnitNormWarning",
    "look_loss",
    "look_loss_terms",
]

NoPositiveRule = Literal["drop", "nearest"]
NO_POSITIVE_RULES: tuple[str, ...] = ("drop", "nearest")


class LookLossTerms(NamedTuple):
    """Per-query outputs of :func:`look_loss_terms`.

    Attributes:
        loss: ``(B,)`` −log p_i (fp32, fp64 for fp64 input); exactly 0 where not ``valid``.
        valid: ``(B,)`` bool, the queries that take part in the mean.
        positive_in_topk: ``(B,)`` bool, a same-label row is among the true top-k (before any
            ``no_positive="nearest"`` swap); with ``k=None``, the query has any same-label candidate.
        neighbour_indices: ``(B, k_eff)`` int64 memory rows that entered the loss (after the
            ``"nearest"`` swap), ``-1`` for padding, in no particular order;
            ``k_eff = min(k, N)``. Empty ``(B, 0)`` for
            ``k=None`` (all candidates are used; listing them would be ``B × N``).
        neighbour_agreement: ``(B,)`` fraction of the true neighbours (before any swap; all
            candidates for ``k=None``) that share the query's label; 0 when there are none.
        inexact: ``None``, or with ``defer_exactness_check=True`` a 0-d bool on the device:
            true when the fused search overflowed for some query, so that these terms are not
            exact and must be recomputed (without deferring).
    """

    loss: Tensor
    valid: Tensor
    positive_in_topk: Tensor
    neighbour_indices: Tensor
    neighbour_agreement: Tensor
    inexact: Tensor | None = None


def check_temperature(temperature: float) -> float:
    """Return ``temperature`` as a float, or raise ``ValueError`` unless it is finite and > 0."""
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return value


def _check_k_or_none(k: int | None) -> int | None:
    return None if k is None else check_positive_int(k)


def _check_no_positive(no_positive: str) -> str:
    if no_positive not in NO_POSITIVE_RULES:
        raise ValueError(
            f"no_positive must be one of {NO_POSITIVE_RULES}, got {no_positive!r} "
            "('drop' leaves such queries out of the mean, 'nearest' swaps in the nearest "
            "same-label row)"
        )
    return no_positive


def masked_logsumexp(logits: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """``logsumexp`` over the entries where ``mask`` is True.

    Masked entries get the dtype's most negative *finite* value rather than ``-inf``: an all-masked
    row then yields a finite (huge negative) result and finite gradients, so no NaN can leak into
    the backward pass even when that row is later discarded by ``torch.where``.
    """
    filled = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return torch.logsumexp(filled, dim=dim)


def _validate_loss_inputs(
    query: Tensor,
    query_labels: Tensor,
    memory: Tensor,
    memory_labels: Tensor,
    query_indices: Tensor | None,
    memory_ids: Tensor | None,
    memory_valid: Tensor | None,
    *,
    check_finite_query: bool,
) -> None:
    for name, tensor in (("query_labels", query_labels), ("memory_labels", memory_labels)):
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    validate_search_inputs(
        query,
        memory,
        query_ids=query_indices,
        memory_ids=memory_ids,
        memory_valid=memory_valid,
        query_labels=query_labels,
        memory_labels=memory_labels,
    )
    # On an accelerator this check would stall the step; look_loss_terms marks such queries
    # with a NaN loss there instead.
    if check_finite_query and host_reads_are_free(memory.device):
        refuse_non_finite_on_host("LOOK", query=query)
        # A NaN memory row would be every query's nearest neighbour (a MemoryBank refuses such
        # rows; a tensor passed as the memory is checked here, its unused rows aside).
        finite_rows = torch.isfinite(memory).all(dim=1)
        if memory_valid is not None:
            finite_rows = finite_rows | ~memory_valid.to(memory.device)
        if not bool(finite_rows.all()):
            raise ValueError(
                "memory contains NaN or Inf values in rows it searches; check what was written "
                "into it before computing the LOOK loss"
            )


def refuse_non_finite_on_host(loss_name: str, **inputs: Tensor) -> None:
    """Raise ``ValueError`` naming the first input holding NaN or Inf, where the host reads the
    device's values for free (the CPU): for losses used on their own. On an accelerator the
    check would stall every step; a NaN there reaches the loss, which its caller checks."""
    for name, tensor in inputs.items():
        if host_reads_are_free(tensor.device) and not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"{name} contains NaN or Inf values; check the encoder output (e.g. a diverged "
                f"step or an fp16 overflow) before computing the {loss_name} loss"
            )


class NotUnitNormWarning(UserWarning):
    """Embeddings given to a loss module that are not L2-normalised: the losses take
    ``z · m / τ`` as a cosine similarity, so a norm of 3 acts as a temperature 3 times smaller."""


# Rows whose norm is off 1 by more than this are not normalised (bf16 rounding stays below 1e-2).
_UNIT_NORM_TOLERANCE = 1e-2


def warn_unless_unit_rows(module: nn.Module, loss_name: str, **inputs: Tensor | None) -> None:
    """Warn (:class:`NotUnitNormWarning`) when an input's rows are not unit vectors: at every
    call on the CPU, at the module's first only on an accelerator (the host read it costs is
    paid once there)."""
    for name, tensor in inputs.items():
        if not isinstance(tensor, Tensor) or tensor.dim() != 2 or tensor.numel() == 0:
            continue
        if not host_reads_are_free(tensor.device):
            if getattr(module, "_unit_rows_checked", False):
                continue
            module._unit_rows_checked = True  # type: ignore[assignment]
        norms = torch.linalg.vector_norm(tensor.detach().float(), dim=1)
        off = float((norms - 1.0).abs().max())
        if off > _UNIT_NORM_TOLERANCE:  # (NaN compares False: refused elsewhere)
            warnings.warn(
                NotUnitNormWarning(
                    f"{loss_name}: the rows of {name} are not L2-normalised (norms from "
                    f"{float(norms.min()):.3g} to {float(norms.max()):.3g}); the loss reads their "
                    "products as cosine similarities, so normalise them first "
                    "(torch.nn.functional.normalize(z, dim=1))"
                ),
                stacklevel=3,
            )


def _empty_memory_terms(queries: Tensor) -> LookLossTerms:
    """No memory rows: no query has a neighbour; zero loss that still carries the graph."""
    batch = queries.shape[0]
    invalid = torch.zeros(batch, dtype=torch.bool, device=queries.device)
    return LookLossTerms(
        loss=queries.sum(dim=1) * 0,
        valid=invalid,
        positive_in_topk=invalid.clone(),
        neighbour_indices=torch.empty(batch, 0, dtype=torch.int64, device=queries.device),
        neighbour_agreement=queries.new_zeros(batch),
    )


def _constant_rows(memory: Tensor, dtype: torch.dtype, memory_valid: Tensor | None) -> Tensor:
    """A copy of the memory rows in ``dtype``, unwritten rows zeroed, for a product with grad.

    A copy, because the memory may be updated in place between the forward and the backward; the
    zeros, because unwritten rows may hold anything and a NaN there would reach the query's
    gradient through the product even though no logit of that row is used.
    """
    rows = memory.detach().to(dtype, copy=True)
    if memory_valid is not None:
        rows.masked_fill_(~memory_valid.unsqueeze(1), 0.0)
    return rows


def _chunk_masks(
    start: int,
    stop: int,
    batch: int,
    query_labels: Tensor,
    memory_labels: Tensor,
    query_ids: Tensor | None,
    memory_ids: Tensor | None,
    memory_valid: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``(candidate, positive)``, ``(B, stop - start)`` bool, for rows ``start:stop`` of the memory."""
    device = memory_labels.device
    candidate = torch.ones(batch, stop - start, dtype=torch.bool, device=device)
    if memory_valid is not None:
        candidate &= memory_valid[start:stop].unsqueeze(0)
    if query_ids is not None:
        ids = (
            memory_ids[start:stop]
            if memory_ids is not None
            else torch.arange(start, stop, device=device)
        )
        candidate &= query_ids.unsqueeze(1) != ids.unsqueeze(0)
    positive = candidate & (query_labels.unsqueeze(1) == memory_labels[start:stop].unsqueeze(0))
    return candidate, positive


def _chunked_log_sum_exps(
    queries: Tensor,
    rows: Tensor,
    masks: tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None],
    temperature: float,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``log Σ exp(s/τ)`` over the candidate rows and over the positive rows, per query, and the
    number of candidate and of positive rows per query (int64)."""
    batch = queries.shape[0]
    candidate_count = torch.zeros(batch, dtype=torch.int64, device=queries.device)
    positive_count = torch.zeros_like(candidate_count)
    chunk_all: list[Tensor] = []
    chunk_positive: list[Tensor] = []
    for start in range(0, rows.shape[0], chunk_size):
        stop = min(start + chunk_size, rows.shape[0])
        logits = queries @ rows[start:stop].to(queries.dtype).T / temperature  # (B, c)
        candidate, positive = _chunk_masks(start, stop, batch, *masks)
        candidate_count += candidate.sum(dim=1)
        positive_count += positive.sum(dim=1)
        chunk_all.append(masked_logsumexp(logits, candidate))
        chunk_positive.append(masked_logsumexp(logits, positive))
    log_denominator = torch.logsumexp(torch.stack(chunk_all, dim=1), dim=1)
    log_numerator = torch.logsumexp(torch.stack(chunk_positive, dim=1), dim=1)
    return log_denominator, log_numerator, candidate_count, positive_count


class _AllCandidatesLogSumExp(torch.autograd.Function):
    """``log Σ exp(s/τ)`` over every candidate row and over the positive ones, chunk by chunk.

    Keeps no ``B × N`` tensor for backward (autograd would keep ~3 per chunk: 3.9 GB for 256
    queries over 1.28M rows): the backward recomputes each chunk's similarities from the queries
    and a copy of the rows (``N × d`` in the memory's dtype).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        queries: Tensor,
        rows: Tensor,
        masks: tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None],
        temperature: float,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        outputs = _chunked_log_sum_exps(queries, rows, masks, temperature, chunk_size)
        log_denominator, log_numerator, candidate_count, positive_count = outputs
        ctx.save_for_backward(queries, rows, log_denominator, log_numerator)
        ctx.masks, ctx.temperature, ctx.chunk_size = masks, temperature, chunk_size
        ctx.mark_non_differentiable(candidate_count, positive_count)
        return outputs

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad_denominator: Tensor,
        grad_numerator: Tensor,
        *_grad_counts: Tensor,
    ) -> tuple[Tensor | None, ...]:
        queries, rows, log_denominator, log_numerator = ctx.saved_tensors  # type: ignore[attr-defined]
        masks, temperature, chunk_size = ctx.masks, ctx.temperature, ctx.chunk_size  # type: ignore[attr-defined]
        grad_queries = torch.zeros_like(queries)
        for start in range(0, rows.shape[0], chunk_size):
            stop = min(start + chunk_size, rows.shape[0])
            chunk_rows = rows[start:stop].to(queries.dtype)
            logits = queries @ chunk_rows.T / temperature
            candidate, positive = _chunk_masks(start, stop, queries.shape[0], *masks)
            # d logsumexp / d logit = softmax over the masked entries; where() (not a product)
            # keeps the exp of masked or -inf entries from turning into NaN.
            weights = torch.where(
                candidate, torch.exp(logits - log_denominator.unsqueeze(1)), 0.0
            ) * grad_denominator.unsqueeze(1)
            weights += torch.where(
                positive, torch.exp(logits - log_numerator.unsqueeze(1)), 0.0
            ) * grad_numerator.unsqueeze(1)
            grad_queries += weights @ chunk_rows / temperature
        return grad_queries, None, None, None, None


# Above this many B × N similarities (as for the dense paths), NCA recomputes its chunks in
# backward instead of keeping them.
_NCA_RECOMPUTE_ABOVE = 1 << 26


def _all_candidates_terms(
    queries: Tensor,
    query_labels: Tensor,
    memory: Tensor,
    memory_labels: Tensor,
    *,
    temperature: float,
    query_ids: Tensor | None,
    memory_ids: Tensor | None,
    memory_valid: Tensor | None,
    chunk_size: int,
) -> LookLossTerms:
    """``k=None`` (NCA): every candidate row is a neighbour; logits computed chunk by chunk."""
    batch, rows = queries.shape[0], memory.shape[0]
    device, dtype = queries.device, queries.dtype
    masks = (query_labels, memory_labels, query_ids, memory_ids, memory_valid)
    # Kept in the memory's dtype (a bf16 bank stays bf16); each chunk is cast when it is used.
    rows_copy = _constant_rows(memory, memory.dtype, memory_valid)
    if batch * rows > _NCA_RECOMPUTE_ABOVE:
        outputs = _AllCandidatesLogSumExp.apply(queries, rows_copy, masks, temperature, chunk_size)
    else:  # small enough to let autograd keep the chunks (no recomputation)
        outputs = _chunked_log_sum_exps(queries, rows_copy, masks, temperature, chunk_size)
    log_denominator, log_numerator, candidate_count, positive_count = outputs
    valid = positive_count > 0
    loss = torch.where(valid, log_denominator - log_numerator, torch.zeros_like(log_denominator))
    agreement = positive_count.to(dtype) / candidate_count.clamp(min=1).to(dtype)
    return LookLossTerms(
        loss=loss,
        valid=valid,
        positive_in_topk=valid.clone(),
        neighbour_indices=torch.empty(batch, 0, dtype=torch.int64, device=device),
        neighbour_agreement=agreement,
    )


# Largest B × N similarity matrix the dense paths below may build (fp32 entries; 256 MB).
_DENSE_LOGITS_LIMIT = 1 << 26


def _dense_is_cheaper(batch: int, rows: int, k: int, dim: int) -> bool:
    """Whether the whole ``B × N`` product beats gathering ``B × k × d`` neighbour rows: when
    ``k·d`` is large next to ``N`` (e.g. k = 2,500 of a 10,000-row bank: 1/30 of the memory
    traffic), and the product fits :data:`_DENSE_LOGITS_LIMIT`."""
    return rows * 4 <= k * dim and batch * rows <= _DENSE_LOGITS_LIMIT


def _selected_logits(
    queries: Tensor,
    memory: Tensor,
    indices: Tensor,
    is_neighbour: Tensor,
    memory_valid: Tensor | None,
) -> Tensor:
    """``queries[i] · memory[indices[i, j]]`` with grad into the queries; memory is a constant.

    Two equal ways (:func:`_dense_is_cheaper` picks): gather the ``B × k × d`` neighbour rows, or
    take the whole ``B × N`` product and gather ``k`` entries per row. Both copy what they read,
    so in-place memory updates before backward are safe.
    """
    batch, dim = queries.shape
    if _dense_is_cheaper(batch, memory.shape[0], indices.shape[1], dim):
        similarities = queries @ _constant_rows(memory, queries.dtype, memory_valid).T  # (B, N)
        return similarities.gather(1, indices).masked_fill(~is_neighbour, 0.0)
    return gathered_row_products(queries, memory, indices, is_neighbour)


def gathered_row_products(
    queries: Tensor, memory: Tensor, indices: Tensor, is_neighbour: Tensor
) -> Tensor:
    """``queries[i] · memory[indices[i, j]]`` ``(B, k)`` through the gathered ``B × k × d``
    rows (copies, in the queries' dtype); 0 where ``is_neighbour`` is False. The sharded loss
    computes its similarities with this too, so that they equal these to the bit."""
    neighbours = memory.detach()[indices].to(queries.dtype)  # (B, k, d)
    # Padding slots point at row 0, which may hold anything (e.g. an unwritten row).
    neighbours = neighbours.masked_fill(~is_neighbour.unsqueeze(-1), 0.0)
    return (queries.unsqueeze(1) * neighbours).sum(dim=-1)


def _dense_search(
    queries: Tensor,
    memory: Tensor,
    k: int,
    *,
    query_ids: Tensor | None,
    memory_ids: Tensor | None,
    memory_valid: Tensor | None,
    query_labels: Tensor | None,
    memory_labels: Tensor | None,
) -> tuple[Tensor, KnnResult]:
    """The ``B × N`` similarities with grad, and the top-``k`` search done on that same product.

    For a small memory and a large ``k`` the search and the loss would each compute this product;
    sharing it saves one of the two (and the search needs no sorted top-k: the neighbours come
    back in no particular order). Same candidates and values as :func:`look.search.knn_search`
    (which rounds the query to a half-precision memory first: only used for fp32/fp64 memories).
    """
    neg_inf = float("-inf")
    rows = _constant_rows(memory, queries.dtype, memory_valid)
    # The bias gives unwritten rows -inf for the search (cheaper than a mask pass over B × N).
    # Without a mask it is zero: the same addmm either way, so a memory that is found full
    # (FeatureMemory.search_valid) gives bit-identical similarities to one searched with its mask.
    bias = torch.zeros(rows.shape[0], dtype=rows.dtype, device=rows.device)
    if memory_valid is not None:
        bias.masked_fill_(~memory_valid, neg_inf)
    similarities = torch.addmm(bias, queries, rows.T)
    # The search writes its exclusions into the product itself: no B × N copy. Safe for
    # autograd, whose saved tensors for the product are its inputs, not its output, and the
    # loss only ever reads the entries the search selects, which are never excluded ones.
    scores = similarities.detach()
    if query_ids is not None:
        exclude_same_ids_(scores, query_ids, memory_ids)
    values, indices = scores.topk(k, dim=1, sorted=False)
    indices = indices.masked_fill(values == neg_inf, -1)
    if query_labels is None or memory_labels is None:
        return similarities, KnnResult(values, indices)
    positive_value, positive_index = nearest_positive(scores, query_labels, memory_labels)
    positive_index = positive_index.masked_fill(positive_value == neg_inf, -1)
    return similarities, KnnResult(values, indices, positive_value, positive_index)


def _top_k_terms(
    queries: Tensor,
    query_labels: Tensor,
    memory: Tensor,
    memory_labels: Tensor,
    *,
    k: int,
    temperature: float,
    query_ids: Tensor | None,
    memory_ids: Tensor | None,
    memory_valid: Tensor | None,
    no_positive: str,
    chunk_size: int,
    search_backend: str,
    defer_exactness_check: bool = False,
    mark_non_finite: bool = False,
    search_prefilter: QuantizedRows | None = None,
) -> LookLossTerms:
    """Finite ``k``: no-grad search, then the selected similarities recomputed with grad (or, for
    a small memory, read from the one ``B × N`` product the search was done on)."""
    k_eff = min(k, memory.shape[0])
    # The nearest same-label row costs a second B × N pass; only the "nearest" rule needs it.
    labels_for_nearest = (query_labels, memory_labels) if no_positive == "nearest" else (None, None)
    share_product = (
        search_backend == "auto"  # "torch" means the chunked scan, always
        and memory.dtype == queries.dtype
        and _dense_is_cheaper(queries.shape[0], memory.shape[0], k_eff, queries.shape[1])
    )
    if share_product:
        similarities, search = _dense_search(
            queries, memory, k_eff, query_ids=query_ids, memory_ids=memory_ids,
            memory_valid=memory_valid, query_labels=labels_for_nearest[0],
            memory_labels=labels_for_nearest[1],
        )  # fmt: skip
        return _terms_from_neighbours(
            search, queries, query_labels, memory, memory_labels, similarities,
            temperature=temperature, memory_valid=memory_valid, no_positive=no_positive,
            mark_non_finite=mark_non_finite,
        )  # fmt: skip
    pending = knn_search_deferred(
        queries, memory, k_eff, query_ids=query_ids, memory_ids=memory_ids,
        memory_valid=memory_valid, chunk_size=chunk_size, query_labels=labels_for_nearest[0],
        memory_labels=labels_for_nearest[1], backend=search_backend, prefilter=search_prefilter,
    )  # fmt: skip

    def terms_from(search: KnnResult) -> LookLossTerms:
        return _terms_from_neighbours(
            search, queries, query_labels, memory, memory_labels, None,
            temperature=temperature, memory_valid=memory_valid, no_positive=no_positive,
            mark_non_finite=mark_non_finite,
        )  # fmt: skip

    terms = terms_from(pending.result)
    if defer_exactness_check:  # the caller reads the flag later and redoes the step if set
        inexact = pending.overflowed.any() if pending.overflowed is not None else None
        return terms._replace(inexact=inexact)
    # The fused search's exactness check waits for the GPU: taken once the loss is queued, the
    # GPU computes it meanwhile. On overflow (rare) the loss is recomputed from exact neighbours.
    exact = pending.finish()
    return terms if exact is pending.result else terms_from(exact)


def _terms_from_neighbours(
    search: KnnResult,
    queries: Tensor,
    query_labels: Tensor,
    memory: Tensor,
    memory_labels: Tensor,
    similarities: Tensor | None,
    *,
    temperature: float,
    memory_valid: Tensor | None,
    no_positive: str,
    mark_non_finite: bool = False,
) -> LookLossTerms:
    """The loss terms of a finite ``k`` from the searched neighbours; the selected similarities
    come from ``similarities`` (the search's own ``B × N`` product) or are recomputed with grad:
    on a GPU by two fused kernels (:mod:`look.losses.look_terms_triton`), else in PyTorch.
    ``mark_non_finite``: give a non-finite query a NaN loss that counts
    (:func:`mark_non_finite_queries`; the fused kernels always do)."""
    neighbour_indices = search.indices
    if (
        similarities is None
        and no_positive == "drop"  # ("nearest" swaps neighbours first: PyTorch does that rule)
        and not _dense_is_cheaper(
            queries.shape[0], memory.shape[0], neighbour_indices.shape[1], queries.shape[1]
        )
        and fused_terms_supported(queries, memory)
    ):
        fused = fused_neighbour_terms(
            queries, memory, neighbour_indices, query_labels, memory_labels, temperature
        )
        if fused is not None:  # (None: the kernel failed to build; it warned once)
            loss, valid, agreement = fused
            return LookLossTerms(
                loss=loss,
                valid=valid,
                # (from the counts, as for PyTorch: under "drop" the same as valid, except for
                # a non-finite query, valid so that its NaN reaches the mean)
                positive_in_topk=agreement > 0,
                neighbour_indices=neighbour_indices,
                neighbour_agreement=agreement,
            )
    is_neighbour = neighbour_indices >= 0
    safe_indices = neighbour_indices.clamp(min=0)
    neighbour_labels = memory_labels[safe_indices]
    is_positive = is_neighbour & (neighbour_labels == query_labels.unsqueeze(1))
    positive_in_topk = is_positive.any(dim=1)
    neighbour_count = is_neighbour.sum(dim=1)
    agreement = is_positive.sum(dim=1).to(queries.dtype) / neighbour_count.clamp(min=1).to(
        queries.dtype
    )

    if no_positive == "nearest":
        # A query whose top-k has no positive has more than k candidates (else its nearest
        # positive, if any, would be in the top-k), so every slot is real and the smallest
        # value is the k-th neighbour: replace it by the nearest same-label candidate of the
        # whole memory.
        swap = (~positive_in_topk & (search.nearest_positive_index >= 0)).unsqueeze(1)  # type: ignore[operator]
        slot = search.values.argmin(dim=1, keepdim=True)
        nearest = search.nearest_positive_index.unsqueeze(1)  # type: ignore[union-attr]
        neighbour_indices = neighbour_indices.scatter(
            1, slot, torch.where(swap, nearest, neighbour_indices.gather(1, slot))
        )
        is_neighbour = neighbour_indices >= 0
        safe_indices = neighbour_indices.clamp(min=0)
        is_positive = is_positive.scatter(1, slot, is_positive.gather(1, slot) | swap)
    valid = is_positive.any(dim=1)

    if similarities is not None:
        logits = similarities.gather(1, safe_indices).masked_fill(~is_neighbour, 0.0)
    else:
        logits = _selected_logits(queries, memory, safe_indices, is_neighbour, memory_valid)
    logits = logits / temperature

    log_denominator = masked_logsumexp(logits, is_neighbour)
    log_numerator = masked_logsumexp(logits, is_positive)
    loss = torch.where(valid, log_denominator - log_numerator, torch.zeros_like(log_denominator))
    if mark_non_finite:
        loss, valid = mark_non_finite_queries(loss, valid, queries)
    return LookLossTerms(
        loss=loss,
        valid=valid,
        positive_in_topk=positive_in_topk,
        neighbour_indices=neighbour_indices,
        neighbour_agreement=agreement,
    )


def look_loss_terms(
    query: Tensor,
    query_labels: Tensor,
    memory: Tensor,
    memory_labels: Tensor,
    *,
    k: int | None,
    temperature: float,
    query_indices: Tensor | None = None,
    memory_ids: Tensor | None = None,
    memory_valid: Tensor | None = None,
    no_positive: NoPositiveRule = "drop",
    chunk_size: int = 65536,
    search_backend: SearchBackend = "auto",
    defer_exactness_check: bool = False,
    check_finite_query: bool = True,
    search_prefilter: QuantizedRows | None = None,
) -> LookLossTerms:
    """Per-query LOOK loss terms (see the module docstring for the definition).

    Args:
        query: ``(B, d)`` L2-normalised embeddings (any float dtype; computed in at least fp32).
        query_labels: ``(B,)`` integer labels.
        memory: ``(N, d)`` memory rows (fp32/bf16/fp16); treated as a constant (no gradient).
        memory_labels: ``(N,)`` integer labels of the memory rows.
        k: neighbours per query (``>= 1``), or ``None`` for all candidate rows (NCA).
        temperature: τ > 0.
        query_indices: ``(B,)`` dataset indices of the queries; memory rows with the same id are
            excluded (leave-one-out). ``None`` excludes nothing.
        memory_ids: ``(N,)`` ids of the memory rows, default ``arange(N)`` (a bank indexed by
            dataset index); a queue passes its stored ids.
        memory_valid: ``(N,)`` bool; rows marked ``False`` (not yet written) are never neighbours.
        no_positive: what to do with a query whose top-k holds no same-label row: ``"drop"`` it
            from the mean, or ``"nearest"``: swap its k-th neighbour for the nearest same-label
            candidate of the whole memory (dropped if there is none). Unused for ``k=None``.
        chunk_size: memory rows per chunk of the search / of the NCA logits.
        search_backend: the neighbour search: ``"auto"`` (the fused GPU search where it applies;
            for a small fp32 memory and a large k, a search on the loss's own ``B × N`` product;
            else the chunked scan of :func:`look.search.knn_search`), ``"torch"`` (always the
            chunked scan) or ``"triton"`` (require the fused search). Unused for ``k=None``.
        defer_exactness_check: do not wait for the GPU to learn whether the fused search
            overflowed (which makes it redo those queries exactly); return the terms with
            ``inexact`` set instead, for a caller that reads it together with its own checks
            and recomputes the terms without deferring when it is true.
        check_finite_query: on the CPU, refuse a NaN/Inf query (``ValueError``). ``False``
            gives it a NaN loss term instead, as on an accelerator: for a caller that checks
            every loss itself (the trainer, which may then skip the step).
        search_prefilter: an int8 copy of ``memory`` for the fused search
            (:class:`look.search_triton.QuantizedRows`, e.g. a bank's ``search_prefilter()``):
            same neighbours, about half the bytes read. Ignored by the other searches.

    Returns:
        :class:`LookLossTerms`. A query with no candidate or no positive is not ``valid`` and has
        loss exactly 0; nothing is ever NaN for finite input.

    Raises:
        ValueError: on malformed inputs, and on a NaN/Inf query when it is on the CPU. On an
            accelerator that check would make the host wait for the device every step, so there
            a non-finite query instead gets a NaN ``loss`` (and counts as ``valid``): the mean
            is NaN, which the trainer's per-step loss check reports.
    """
    k = _check_k_or_none(k)
    temperature = check_temperature(temperature)
    no_positive = _check_no_positive(no_positive)  # type: ignore[assignment]
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    search_backend = check_search_backend(search_backend)  # type: ignore[assignment]
    _validate_loss_inputs(
        query, query_labels, memory, memory_labels, query_indices, memory_ids, memory_valid,
        check_finite_query=check_finite_query,
    )  # fmt: skip

    device = memory.device
    dtype = compute_dtype_for(query, memory)
    # (narrow integer dtypes as int64: the search and the gathers index with them)
    query_labels = widen_integer_ids(query_labels.to(device))
    memory_labels = widen_integer_ids(memory_labels.to(device))
    if query_indices is not None:
        query_indices = widen_integer_ids(query_indices.to(device))
    if memory_ids is not None:
        memory_ids = widen_integer_ids(memory_ids.to(device))
    if memory_valid is not None:
        memory_valid = memory_valid.to(device)

    # On an accelerator a non-finite query gets a NaN loss term instead of a host check; so it
    # does on the CPU when the caller checks the loss (else, with no same-label row among its
    # arbitrary neighbours, it would be dropped with loss 0 and a NaN gradient).
    mark_non_finite = not (host_reads_are_free(device) and check_finite_query)
    with autocast_disabled(device):
        queries = query.to(dtype)
        if memory.shape[0] == 0:
            return _empty_memory_terms(queries)
        if k is None:
            terms = _all_candidates_terms(
                queries,
                query_labels,
                memory,
                memory_labels,
                temperature=temperature,
                query_ids=query_indices,
                memory_ids=memory_ids,
                memory_valid=memory_valid,
                chunk_size=chunk_size,
            )
            if mark_non_finite:
                loss, valid = mark_non_finite_queries(terms.loss, terms.valid, queries)
                terms = terms._replace(loss=loss, valid=valid)
        else:
            terms = _top_k_terms(
                queries,
                query_labels,
                memory,
                memory_labels,
                k=k,
                temperature=temperature,
                query_ids=query_indices,
                memory_ids=memory_ids,
                memory_valid=memory_valid,
                no_positive=no_positive,
                chunk_size=chunk_size,
                search_backend=search_backend,
                defer_exactness_check=defer_exactness_check,
                mark_non_finite=mark_non_finite,
                search_prefilter=search_prefilter,
            )
    return terms


def mark_non_finite_queries(loss: Tensor, valid: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
    """``(loss, valid)`` with a NaN loss term, counted as valid, for every non-finite query.

    The check on the device that replaces a host check on an accelerator (``look.host_sync``):
    the mean is then NaN, and the trainer's per-step loss check stops or skips the step.
    """
    query_finite = torch.isfinite(queries.detach()).all(dim=1)
    return torch.where(query_finite, loss, torch.nan), valid | ~query_finite


def masked_mean(loss: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``loss`` over ``valid`` entries; an exact zero (still carrying the graph) if none.

    ``loss`` must already be 0 where not valid (as every ``*_terms`` function returns it), so the
    sum needs no mask and no host-device synchronisation is required.
    """
    return loss.sum() / valid.sum().clamp(min=1).to(loss.dtype)


def look_loss(
    query: Tensor,
    query_labels: Tensor,
    memory: Tensor,
    memory_labels: Tensor,
    *,
    k: int | None,
    temperature: float,
    query_indices: Tensor | None = None,
    memory_ids: Tensor | None = None,
    memory_valid: Tensor | None = None,
    no_positive: NoPositiveRule = "drop",
    chunk_size: int = 65536,
    search_backend: SearchBackend = "auto",
) -> Tensor:
    """Scalar LOOK loss: mean of :func:`look_loss_terms` ``.loss`` over the valid queries.

    Local mean only; under DDP reduce the terms with
    ``look.engine.distributed.global_masked_mean`` instead.
    """
    terms = look_loss_terms(
        query,
        query_labels,
        memory,
        memory_labels,
        k=k,
        temperature=temperature,
        query_indices=query_indices,
        memory_ids=memory_ids,
        memory_valid=memory_valid,
        no_positive=no_positive,
        chunk_size=chunk_size,
        search_backend=search_backend,
    )
    return masked_mean(terms.loss, terms.valid)


class LookLoss(nn.Module):
    """Module form of :func:`look_loss`; holds ``k``, ``temperature``, ``no_positive``,
    ``chunk_size`` and ``search_backend``.

    The memory is either a :class:`look.memory.MemoryBank` / :class:`look.memory.MemoryQueue`
    (its rows, labels, ids, valid mask and int8 search copy are read from it: nothing to
    unpack or forget), or raw tensors as :func:`look_loss_terms` takes them::

        loss = LookLoss(k=200, temperature=0.07)(z, labels, bank, query_indices=indices)
        loss = LookLoss(k=200, temperature=0.07)(z, labels, rows, row_labels, memory_valid=m)

    Args:
        k: neighbours per query (``None``: every row, i.e. NCA).
        temperature: τ > 0.
        no_positive: ``"drop"`` or ``"nearest"``, see :func:`look_loss_terms`.
        chunk_size: memory rows per step of the chunked PyTorch scan.
        search_backend: ``"auto"``, ``"torch"`` or ``"triton"``.
    """

    def __init__(
        self,
        k: int | None,
        temperature: float,
        *,
        no_positive: NoPositiveRule = "drop",
        chunk_size: int = 65536,
        search_backend: SearchBackend = "auto",
    ) -> None:
        super().__init__()
        self.k = _check_k_or_none(k)
        self.temperature = check_temperature(temperature)
        self.no_positive: NoPositiveRule = _check_no_positive(no_positive)  # type: ignore[assignment]
        self.chunk_size = check_positive_int(chunk_size, "chunk_size")
        self.search_backend: SearchBackend = check_search_backend(search_backend)  # type: ignore[assignment]

    def terms(
        self,
        query: Tensor,
        query_labels: Tensor,
        memory: Tensor | nn.Module,
        memory_labels: Tensor | None = None,
        *,
        query_indices: Tensor | None = None,
        memory_ids: Tensor | None = None,
        memory_valid: Tensor | None = None,
    ) -> LookLossTerms:
        """Per-query terms, as :func:`look_loss_terms` with this module's settings."""
        warn_unless_unit_rows(self, "LookLoss", query=query)
        prefilter = None
        if isinstance(memory, nn.Module):
            module = memory
            memory, memory_labels, memory_ids, memory_valid, prefilter = _memory_inputs(
                module, memory_labels, memory_ids, memory_valid
            )
            _check_bank_query_indices(module, query_indices)
        elif memory_labels is None:
            raise ValueError("memory_labels is required when the memory is a tensor")
        return look_loss_terms(
            query,
            query_labels,
            memory,
            memory_labels,
            k=self.k,
            temperature=self.temperature,
            query_indices=query_indices,
            memory_ids=memory_ids,
            memory_valid=memory_valid,
            no_positive=self.no_positive,
            chunk_size=self.chunk_size,
            search_backend=self.search_backend,
            search_prefilter=prefilter,
        )

    def forward(
        self,
        query: Tensor,
        query_labels: Tensor,
        memory: Tensor | nn.Module,
        memory_labels: Tensor | None = None,
        *,
        query_indices: Tensor | None = None,
        memory_ids: Tensor | None = None,
        memory_valid: Tensor | None = None,
    ) -> Tensor:
        """Scalar loss (local masked mean of :meth:`terms`)."""
        terms = self.terms(
            query,
            query_labels,
            memory,
            memory_labels,
            query_indices=query_indices,
            memory_ids=memory_ids,
            memory_valid=memory_valid,
        )
        return masked_mean(terms.loss, terms.valid)

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, temperature={self.temperature}, no_positive={self.no_positive!r}, "
            f"chunk_size={self.chunk_size}, search_backend={self.search_backend!r}"
        )


def _check_bank_query_indices(memory: nn.Module, query_indices: Tensor | None) -> None:
    """A bank's row i is dataset image i: without the queries' indices leave-one-out cannot
    exclude their own rows (each would be its own nearest neighbour), and an index outside the
    bank excludes nothing. A queue compares the ids it stores with them. (-1: a query that is
    not in the memory.)"""
    from look.memory import MemoryBank, MemoryQueue

    if isinstance(memory, MemoryQueue) and query_indices is None:
        raise ValueError(
            "query_indices is required with a MemoryQueue: leave-one-out excludes the queue's "
            "entries of each query's own image by the dataset index stored with them (pass -1 "
            "for a query that is not in the dataset)"
        )
    if not isinstance(memory, MemoryBank):
        return
    if query_indices is None:
        raise ValueError(
            "query_indices is required with a MemoryBank: its row i is dataset image i, and "
            "leave-one-out excludes each query's own row by its index (pass -1 for a query "
            "that is not in the bank)"
        )
    check_query_indices_in_bank(query_indices, memory.size)


def check_query_indices_in_bank(query_indices: Tensor, rows: int, *, where: str = "") -> None:
    """``ValueError`` unless every index lies in ``[-1, rows)`` (a bank's rows, -1 for a query
    that is not in it): an index past the bank excludes nothing, leaving a query's own row among
    its neighbours. Checked where reading the device is free (the CPU)."""
    if host_reads_are_free(query_indices.device) and query_indices.numel():
        low, high = int(query_indices.min()), int(query_indices.max())
        if low < -1 or high >= rows:
            raise ValueError(
                f"query_indices lie in [{low}, {high}], outside [-1, {rows}) (the bank's "
                f"rows{where}; -1 for a query that is not in it)"
            )


def _memory_inputs(
    memory: nn.Module,
    memory_labels: Tensor | None,
    memory_ids: Tensor | None,
    memory_valid: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, QuantizedRows | None]:
    """The tensors :func:`look_loss_terms` takes, read from a memory module."""
    from look.memory import MemoryBank, MemoryQueue
    from look.sharded import ShardedMemoryBank

    if isinstance(memory, ShardedMemoryBank):
        raise ValueError(
            "a ShardedMemoryBank holds this rank's rows only: use "
            "look.sharded.sharded_look_loss_terms, which searches every rank's shard"
        )
    if not isinstance(memory, (MemoryBank, MemoryQueue)):
        raise ValueError(
            f"memory must be a tensor, a MemoryBank or a MemoryQueue, got {type(memory).__name__}"
        )
    given = [name for name, value in (("memory_labels", memory_labels), ("memory_ids", memory_ids),
                                      ("memory_valid", memory_valid)) if value is not None]  # fmt: skip
    if given:
        raise ValueError(f"{', '.join(given)}: read from the memory module; pass tensors instead")
    # A bank's row i is dataset image i (leave-one-out compares row numbers); a queue's rows
    # are compared by the ids they store.
    ids = memory.ids if isinstance(memory, MemoryQueue) else None
    return memory.features, memory.labels, ids, memory.search_valid(), memory.search_prefilter()
