"""Exact k-nearest-neighbour search by inner product over a (large) memory, chunk by chunk.

The memory is scanned in chunks of rows; each chunk's similarities are computed in (at least) fp32
and merged into a running top-k per query, so a ``B × N`` similarity matrix is never held at once.
Used by the LOOK loss (neighbour selection) and by kNN evaluation.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from look.host_sync import host_reads_are_free
from look.kernel_fallback import KernelFallback
from look.search_triton import QuantizedRows, fused_knn_search, fused_search_supported

__all__ = [
    "SEARCH_BACKENDS",
    "DeferredKnnResult",
    "KnnResult",
    "SearchBackend",
    "autocast_disabled",
    "check_positive_int",
    "check_search_backend",
    "compute_dtype_for",
    "exclude_own_rows_",
    "exclude_same_ids_",
    "knn_search",
    "knn_search_deferred",
    "nearest_positive",
    "validate_search_inputs",
]


SearchBackend = Literal["auto", "torch", "triton"]
SEARCH_BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


def check_search_backend(backend: str) -> str:
    """Return ``backend`` or raise ``ValueError`` unless it is one of :data:`SEARCH_BACKENDS`."""
    if backend not in SEARCH_BACKENDS:
        raise ValueError(
            f"search backend must be one of {SEARCH_BACKENDS}, got {backend!r} ('auto': the fused "
            "GPU search where it applies, 'torch': always the chunked scan, 'triton': require the "
            "fused search)"
        )
    return backend


class KnnResult(NamedTuple):
    """Result of :func:`knn_search`.

    ``values``/``indices`` are ``(B, k)``, sorted by descending similarity; slots beyond the number
    of candidates hold ``-inf`` / ``-1``. ``nearest_positive_value``/``nearest_positive_index`` are
    ``(B,)`` and only set when labels were given: the most similar candidate of the query's own label
    over the whole memory (``-inf`` / ``-1`` when there is none), otherwise ``None``.
    """

    values: Tensor
    indices: Tensor
    nearest_positive_value: Tensor | None = None
    nearest_positive_index: Tensor | None = None


def autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Context that switches autocast off on ``device`` (a no-op where autocast does not exist).

    Similarities and losses must be computed in full precision even when the caller runs under
    ``torch.autocast`` (e.g. bf16 embeddings from an autocast forward).
    """
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def compute_dtype_for(*tensors: Tensor) -> torch.dtype:
    """The dtype similarities are computed in: fp32, or fp64 when an input is fp64."""
    dtype = torch.float32
    for tensor in tensors:
        if tensor.is_floating_point():
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def check_positive_int(k: object, name: str = "k") -> int:
    """Return ``k`` as an ``int`` or raise ``ValueError`` naming ``name`` unless it is an integer >= 1."""
    if isinstance(k, bool):
        raise ValueError(f"{name} must be a positive integer, got {k!r}")
    try:
        k_int = operator.index(k)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {k!r}") from None
    if k_int < 1:
        raise ValueError(f"{name} must be >= 1, got {k_int}")
    return k_int


def _check_vector(tensor: Tensor | None, name: str, length: int, length_name: str) -> None:
    if tensor is None:
        return
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 1 or tensor.shape[0] != length:
        raise ValueError(
            f"{name} must have shape ({length},) to match {length_name}, got {tuple(tensor.shape)}"
        )


def validate_search_inputs(
    query: Tensor,
    memory: Tensor,
    *,
    query_ids: Tensor | None = None,
    memory_ids: Tensor | None = None,
    memory_valid: Tensor | None = None,
    query_labels: Tensor | None = None,
    memory_labels: Tensor | None = None,
) -> None:
    """Raise ``ValueError`` unless the tensors describe a well-formed query/memory pair."""
    for name, tensor in (("query", query), ("memory", memory)):
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if query.shape[1] != memory.shape[1]:
        raise ValueError(
            f"query and memory must have the same feature dimension, got query {tuple(query.shape)} "
            f"and memory {tuple(memory.shape)}"
        )
    if query.device != memory.device:
        raise ValueError(
            f"query and memory must be on the same device, got {query.device} and {memory.device}"
        )
    batch, rows = query.shape[0], memory.shape[0]
    _check_vector(query_ids, "query_ids", batch, "query rows")
    _check_vector(memory_ids, "memory_ids", rows, "memory rows")
    _check_vector(memory_valid, "memory_valid", rows, "memory rows")
    _check_vector(query_labels, "query_labels", batch, "query rows")
    _check_vector(memory_labels, "memory_labels", rows, "memory rows")
    if memory_valid is not None and memory_valid.dtype != torch.bool:
        raise ValueError(f"memory_valid must be a bool tensor, got dtype {memory_valid.dtype}")
    if memory_ids is not None and query_ids is None:
        raise ValueError(
            "memory_ids was given without query_ids; pass both to exclude self-matches"
        )
    for name, tensor in (
        ("query_ids", query_ids),
        ("memory_ids", memory_ids),
        ("query_labels", query_labels),
        ("memory_labels", memory_labels),
    ):
        if tensor is not None and (tensor.is_floating_point() or tensor.dtype == torch.bool):
            raise ValueError(f"{name} must be an integer tensor, got dtype {tensor.dtype}")


def widen_integer_ids(tensor: Tensor | None) -> Tensor | None:
    """Ids or labels of a narrow integer dtype (int8, uint8, int16, …) as int64: indexing and
    ``gather`` take int32/int64 only. int32 and int64 tensors are returned as they are."""
    if tensor is None or tensor.dtype in (torch.int32, torch.int64):
        return tensor
    return tensor.long()


def exclude_own_rows_(similarities: Tensor, query_ids: Tensor, *, first_row: int = 0) -> None:
    """Set ``similarities[i, query_ids[i] - first_row]`` to ``-inf`` where that column exists.

    ``similarities`` is ``(B, c)``, the rows ``first_row ... first_row + c - 1`` of a memory whose
    row ``j`` holds sample ``j``: each query's own row is then excluded by a gather and a scatter
    of one column per query (a boolean index would make the host wait for the device).
    """
    columns = similarities.shape[1]
    column = query_ids - first_row
    own_here = ((column >= 0) & (column < columns)).unsqueeze(1)
    column = column.clamp(0, columns - 1).unsqueeze(1)
    kept = similarities.gather(1, column)
    similarities.scatter_(1, column, torch.where(own_here, float("-inf"), kept))


def exclude_same_ids_(
    similarities: Tensor, query_ids: Tensor, memory_ids: Tensor | None, *, first_row: int = 0
) -> None:
    """Leave-one-out on a ``(B, c)`` chunk of similarities: ``-inf`` where a memory row holds the
    query's own sample. ``memory_ids`` are the chunk's row ids, or None when row ``j`` of the
    memory holds sample ``j`` (then one column per query, :func:`exclude_own_rows_`)."""
    if memory_ids is None:
        exclude_own_rows_(similarities, query_ids, first_row=first_row)
    else:
        same_id = query_ids.unsqueeze(1) == memory_ids.unsqueeze(0)
        similarities.masked_fill_(same_id, float("-inf"))


def nearest_positive(
    similarities: Tensor, query_labels: Tensor, memory_labels: Tensor
) -> tuple[Tensor, Tensor]:
    """Per query, the largest similarity of a same-label row of this ``(B, c)`` chunk and its
    column (``-inf`` and an arbitrary column where there is none)."""
    same_label = query_labels.unsqueeze(1) == memory_labels.unsqueeze(0)
    return similarities.masked_fill(~same_label, float("-inf")).max(dim=1)


@torch.no_grad()
def knn_search(
    query: Tensor,
    memory: Tensor,
    k: int,
    *,
    query_ids: Tensor | None = None,
    memory_ids: Tensor | None = None,
    memory_valid: Tensor | None = None,
    chunk_size: int = 65536,
    query_labels: Tensor | None = None,
    memory_labels: Tensor | None = None,
    backend: SearchBackend = "auto",
    prefilter: QuantizedRows | None = None,
    check_finite: bool = True,
) -> KnnResult:
    """Exact top-``k`` memory rows by inner product ``query @ memory.T``, scanned in chunks.

    Args:
        query: ``(B, d)`` queries (any float dtype).
        memory: ``(N, d)`` memory rows; may be bf16/fp16, each chunk is cast up before the product.
        k: number of neighbours (``>= 1``; may exceed the number of candidates).
        query_ids: ``(B,)`` int ids of the queries; with them, memory row ``j`` is not a candidate
            for query ``i`` when ``memory_ids[j] == query_ids[i]`` (leave-one-out).
        memory_ids: ``(N,)`` int ids of the memory rows, default ``arange(N)`` (a full bank indexed
            by dataset index). Only used with ``query_ids``.
        memory_valid: ``(N,)`` bool, ``False`` for rows that are never candidates (unwritten rows).
        chunk_size: memory rows per chunk; bounds the working set to ``B × (chunk_size + k)``.
        query_labels, memory_labels: give both to also get the nearest same-label candidate of
            each query over the whole memory (``nearest_positive_value``/``_index``).
        backend: ``"auto"`` uses the fused Triton search (:mod:`look.search_triton`) where it
            applies (CUDA bf16/fp16 memory, rows indexed by position, no labels) and this
            function's chunked PyTorch scan otherwise; ``"torch"`` forces the scan, ``"triton"``
            requires the fused search.
        prefilter: an int8 copy of ``memory`` (:class:`look.search_triton.QuantizedRows`) that
            the fused search reads instead, re-scoring its candidates from ``memory``: the same
            neighbours for about half the bytes read. The scan ignores it.

    With a bf16/fp16 memory the query is rounded to the memory's dtype first, on every device and
    backend, so both backends compute the same similarities (products of two half-precision
    vectors, accumulated in fp32).

    Returns:
        :class:`KnnResult` with ``values``/``indices`` of shape ``(B, k)`` sorted descending;
        ``-inf``/``-1`` where a query has fewer than ``k`` candidates. Values are fp32 (fp64 when
        an input is fp64). Nothing carries gradient.

    Where reading the device is free (the CPU) a non-finite query or candidate row is refused
    (``ValueError``): a NaN row would be every query's nearest neighbour. On a GPU that check
    would wait for the device, so it is left to the caller (the losses and memories check
    their inputs on the device). ``check_finite=False`` skips it for a caller that checked its
    inputs once and searches one memory block of queries by block (it would scan the memory
    again for every block).
    """
    if check_finite and host_reads_are_free(query.device):
        _refuse_non_finite(query, memory, memory_valid)
    search = knn_search_deferred(
        query, memory, k, query_ids=query_ids, memory_ids=memory_ids, memory_valid=memory_valid,
        chunk_size=chunk_size, query_labels=query_labels, memory_labels=memory_labels,
        backend=backend, prefilter=prefilter,
    )  # fmt: skip
    return search.finish()


def _refuse_non_finite(query: Tensor, memory: Tensor, memory_valid: Tensor | None) -> None:
    """``ValueError`` naming the first non-finite query, or candidate memory row (a row that
    ``memory_valid`` leaves out may hold anything: an unwritten row). Inputs of the wrong shape
    are left to :func:`validate_search_inputs`, which names them."""
    if not (isinstance(query, Tensor) and isinstance(memory, Tensor)):
        return
    if query.dim() != 2 or memory.dim() != 2:
        return
    if memory_valid is not None and tuple(memory_valid.shape) != (memory.shape[0],):
        return
    bad_queries = ~torch.isfinite(query).all(dim=1)
    if bool(bad_queries.any()):
        first = int(bad_queries.nonzero()[0])
        raise ValueError(
            f"query holds NaN or Inf in {int(bad_queries.sum())} row(s), the first row {first}"
        )
    bad_rows = ~torch.isfinite(memory).all(dim=1)
    if memory_valid is not None:
        bad_rows &= memory_valid.to(bad_rows.device, torch.bool)
    if bool(bad_rows.any()):
        first = int(bad_rows.nonzero()[0])
        raise ValueError(
            f"memory holds NaN or Inf in {int(bad_rows.sum())} candidate row(s), the first row "
            f"{first}: such a row would be every query's nearest neighbour"
        )


class DeferredKnnResult(NamedTuple):
    """A search whose exactness check may still be pending (:func:`knn_search_deferred`).

    ``result`` is exact except for the queries ``overflowed`` marks (a ``(B,)`` bool on the
    device, set by the fused search only). :meth:`finish` reads that flag (a host sync on a GPU)
    and redoes those queries with the scan.
    """

    result: KnnResult
    overflowed: Tensor | None
    redo: Callable[[Tensor], KnnResult] | None

    def finish(self) -> KnnResult:
        if self.overflowed is None or self.redo is None:
            return self.result
        # The one host synchronisation of the fused path: exactness needs to know whether any
        # query overflowed (in practice only a memory of many near-identical rows does).
        if not bool(self.overflowed.any()):
            return self.result
        return self.redo(self.overflowed.nonzero().squeeze(1))


@torch.no_grad()
def knn_search_deferred(
    query: Tensor,
    memory: Tensor,
    k: int,
    *,
    query_ids: Tensor | None = None,
    memory_ids: Tensor | None = None,
    memory_valid: Tensor | None = None,
    chunk_size: int = 65536,
    query_labels: Tensor | None = None,
    memory_labels: Tensor | None = None,
    backend: SearchBackend = "auto",
    prefilter: QuantizedRows | None = None,
) -> DeferredKnnResult:
    """:func:`knn_search` whose fused path does not wait for the GPU: the caller queues the work
    that uses the neighbours, then calls ``.finish()`` (which waits, and only on overflow
    returns other neighbours: the caller then recomputes). A host wait taken after that work is
    queued keeps the GPU busy while the host waits, instead of idle while the host launches it.
    """
    k = check_positive_int(k)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    validate_search_inputs(
        query,
        memory,
        query_ids=query_ids,
        memory_ids=memory_ids,
        memory_valid=memory_valid,
        query_labels=query_labels,
        memory_labels=memory_labels,
    )
    if (query_labels is None) != (memory_labels is None):
        raise ValueError("query_labels and memory_labels must be given together (or neither)")
    query_ids, memory_ids = widen_integer_ids(query_ids), widen_integer_ids(memory_ids)
    query_labels, memory_labels = widen_integer_ids(query_labels), widen_integer_ids(memory_labels)
    check_search_backend(backend)
    fused = query_labels is None and fused_search_supported(query, memory, memory_ids=memory_ids)
    if backend == "triton" and not fused:
        raise ValueError(
            "backend='triton' needs Triton, a CUDA bf16/fp16 memory indexed by row (no memory_ids)"
            " and no labels"
        )
    if fused and (backend == "triton" or (backend == "auto" and not _SEARCH_FALLBACK.failed)):
        try:
            return _fused_search(
                query, memory, k, query_ids=query_ids, memory_valid=memory_valid,
                chunk_size=chunk_size, prefilter=prefilter,
            )  # fmt: skip
        except Exception as error:  # any compile or launch failure of the kernel
            if backend == "triton":  # asked for explicitly: fail loudly
                raise
            # A training run must not die because Triton cannot build the kernel for this GPU or
            # version: say so once and use the (exact, slower) scan from now on.
            _SEARCH_FALLBACK.fail(error)

    device = memory.device
    dtype = compute_dtype_for(query, memory)
    batch, rows = query.shape[0], memory.shape[0]
    want_positive = query_labels is not None and memory_labels is not None

    # Row ids default to row positions (a bank indexed by dataset index): then a query's own row
    # is excluded by one scatter per chunk instead of a B × chunk comparison of ids.
    ids_are_rows = memory_ids is None
    if query_ids is not None:
        query_ids = query_ids.to(device)
        if memory_ids is not None:
            memory_ids = memory_ids.to(device)
    if memory_valid is not None:
        memory_valid = memory_valid.to(device)
        # A full memory needs no mask: skip a B × N pass, where asking costs no device sync.
        if host_reads_are_free(device) and bool(memory_valid.all()):
            memory_valid = None
    if want_positive:
        query_labels = query_labels.to(device)  # type: ignore[union-attr]
        memory_labels = memory_labels.to(device)  # type: ignore[union-attr]

    neg_inf = float("-inf")
    best_values = torch.empty(batch, 0, dtype=dtype, device=device)
    best_indices = torch.empty(batch, 0, dtype=torch.int64, device=device)
    positive_value = torch.full((batch,), neg_inf, dtype=dtype, device=device)
    positive_index = torch.full((batch,), -1, dtype=torch.int64, device=device)

    with autocast_disabled(device):
        queries = query.detach()
        if memory.dtype in (torch.bfloat16, torch.float16):
            queries = queries.to(memory.dtype)  # same similarities as the fused search
        queries = queries.to(dtype)
        for start in range(0, rows, chunk_size):
            stop = min(start + chunk_size, rows)
            similarities = queries @ memory[start:stop].detach().to(dtype).T  # (B, c)
            if memory_valid is not None:
                similarities.masked_fill_(~memory_valid[start:stop].unsqueeze(0), neg_inf)
            if query_ids is not None:
                chunk_ids = None if ids_are_rows else memory_ids[start:stop]  # type: ignore[index]
                exclude_same_ids_(similarities, query_ids, chunk_ids, first_row=start)

            if best_values.shape[1] == 0:  # first chunk: no running list to merge with
                keep = min(k, similarities.shape[1])
                best_values, order = similarities.topk(keep, dim=1, largest=True, sorted=True)
                best_indices = order + start
            else:
                chunk_indices = torch.arange(start, stop, device=device).expand(batch, -1)
                merged_values = torch.cat([best_values, similarities], dim=1)
                merged_indices = torch.cat([best_indices, chunk_indices], dim=1)
                keep = min(k, merged_values.shape[1])
                best_values, order = merged_values.topk(keep, dim=1, largest=True, sorted=True)
                best_indices = merged_indices.gather(1, order)

            if want_positive:
                chunk_best, chunk_arg = nearest_positive(
                    similarities,
                    query_labels,
                    memory_labels[start:stop],  # type: ignore[index,arg-type]
                )
                improved = chunk_best > positive_value
                positive_value = torch.where(improved, chunk_best, positive_value)
                positive_index = torch.where(improved, chunk_arg + start, positive_index)

    if best_values.shape[1] < k:  # fewer memory rows than k
        missing = k - best_values.shape[1]
        best_values = torch.cat(
            [best_values, best_values.new_full((batch, missing), neg_inf)], dim=1
        )
        best_indices = torch.cat([best_indices, best_indices.new_full((batch, missing), -1)], dim=1)
    # Excluded rows may have been picked to fill k slots; they are padding, not neighbours.
    best_indices = best_indices.masked_fill(best_values == neg_inf, -1)

    if not want_positive:
        return DeferredKnnResult(KnnResult(best_values, best_indices), None, None)
    result = KnnResult(best_values, best_indices, positive_value, positive_index)
    return DeferredKnnResult(result, None, None)


_SEARCH_FALLBACK = KernelFallback(
    "the fused Triton neighbour search",
    "falling back to the chunked PyTorch scan for the rest of this process",
)


def _fused_search(
    query: Tensor,
    memory: Tensor,
    k: int,
    *,
    query_ids: Tensor | None,
    memory_valid: Tensor | None,
    chunk_size: int,
    prefilter: QuantizedRows | None = None,
) -> DeferredKnnResult:
    """The fused search; queries whose candidate buffer overflowed are redone by the scan when
    the result is finished."""
    values, indices, overflowed = fused_knn_search(
        query, memory, k, query_ids=query_ids, memory_valid=memory_valid, prefilter=prefilter
    )
    dtype = compute_dtype_for(query, memory)

    def redo(queries: Tensor) -> KnnResult:
        again = knn_search(
            query[queries],
            memory,
            k,
            query_ids=None if query_ids is None else query_ids.to(memory.device)[queries],
            memory_valid=memory_valid,
            chunk_size=chunk_size,
            backend="torch",
        )
        exact_values, exact_indices = values.clone(), indices.clone()
        exact_values[queries] = again.values.to(values.dtype)
        exact_indices[queries] = again.indices
        return KnnResult(exact_values.to(dtype), exact_indices)

    return DeferredKnnResult(KnnResult(values.to(dtype), indices), overflowed, redo)
