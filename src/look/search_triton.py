"""Fused exact k-nearest-neighbour search on the GPU (Triton): no ``B × N`` matrix in memory.

:func:`look.search.knn_search` calls :func:`fused_knn_search` for a CUDA memory stored in bf16/fp16
(the LOOK bank at scale) and keeps its PyTorch path everywhere else; both return the same
neighbours (ties aside), which the tests check on CPU with Triton's interpreter.

Why two passes and not a running top-k in the kernel: a sorted top-200 list per query does not fit
a GPU thread block's registers, but a *threshold* does. The search is exact:

1. **Bound.** One kernel scans every ``s``-th tile of ``BLOCK_N`` memory rows; each program keeps,
   per query, the largest maxima of the tiles it scanned (~4k over all programs) and writes them.
   The ``k``-th largest of any ``k`` or more tile maxima is a lower bound on the query's true
   ``k``-th neighbour similarity: it is attained by ``k`` distinct rows. Keeping only a program's
   largest ones can loosen the bound (more candidates), never break it, and the selection sorts
   ~4k values per query instead of every sampled tile's.
2. **Collect.** The same kernel (same tiles, same arithmetic) scans the whole memory and appends
   every similarity ``>=`` the bound, with its row index, to a small per-query buffer (an atomic
   counter per query). Every true top-``k`` row is among them.
3. **Select.** ``torch.topk`` (or a sort) over the buffer (``B × capacity``, a few thousand
   columns).

Leave-one-out adds no work per similarity: with query ids, the bound is taken for ``k + 1``
neighbours among all rows, so the candidates hold the top-``k`` of the other rows; the query's own
row is masked out of its buffer before the selection.

The memory is read ``1 + 1/s`` times, similarities live only in registers, and a query whose buffer
overflows (a memory with many near-identical rows) is searched again with the PyTorch path, so the
result is always exact. Similarities are those of the query rounded to the memory's dtype with the
memory rows, accumulated in fp32 (``knn_search`` computes the same on every device).

With an int8 copy of the memory (:class:`QuantizedRows`, ``prefilter=``) the collect pass (and,
with ``SearchKernelConfig.int8_bound_pass``, the bound pass) reads half the bytes: it computes
each similarity approximately on int8 tensor cores, with a rigorous bound on the error, keeps
every row whose upper bound reaches the bound (the bound pass takes lower bounds), and the
candidates are re-scored exactly from the bf16/fp16 rows before the selection. The neighbours
are the same.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial

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
    "FUSED_DTYPES",
    "HOPPER_CONFIG",
    "KERNEL_CONFIGS",
    "TUNED_CONFIGS",
    "QuantizedRows",
    "SearchKernelConfig",
    "compile_for_capability",
    "compile_kernel",
    "compile_prefilter_kernels",
    "compile_selection_kernels",
    "cubin_resources",
    "cuobjdump",
    "fused_knn_search",
    "fused_search_supported",
    "get_kernel_config",
    "graph_replay_enabled",
    "ptxas_report",
    "serialization_reason",
    "set_graph_replay",
    "set_kernel_config",
    "triton_available",
    "tune_kernel_config",
    "wgmma_serialization",
]

FUSED_DTYPES = (torch.bfloat16, torch.float16)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """Whether Triton is importable (the fused path also needs a CUDA tensor or the interpreter)."""
    return triton is not None


def fused_search_supported(query: Tensor, memory: Tensor, *, memory_ids: Tensor | None) -> bool:
    """Whether :func:`fused_knn_search` handles this call (else the PyTorch path does).

    Needs Triton, a CUDA memory (or ``TRITON_INTERPRET=1`` for CPU tests), a bf16/fp16 memory (an
    fp32 memory would go through TF32 tensor cores and stop being exact), a feature dimension of
    at most 256 and a memory indexed by row (``memory_ids`` None).
    """
    if triton is None or memory_ids is not None:
        return False
    if memory.dtype not in FUSED_DTYPES or memory.shape[1] > 256 or memory.shape[0] == 0:
        return False
    if query.device != memory.device:
        return False
    if memory.is_cuda:
        # bf16 tensor-core products need Ampere or newer.
        major, _ = torch.cuda.get_device_capability(memory.device)
        return major >= 8 or (major >= 7 and memory.dtype == torch.float16)
    # Triton's CPU interpreter computes through numpy, which has no bf16: it returns garbage.
    return _INTERPRET and memory.dtype == torch.float16


if triton is not None:

    @triton.jit
    def _append_candidates(
        similarities,
        keep,
        offs_q,
        offs_n,
        counts_ptr,
        out_values_ptr,
        out_indices_ptr,
        capacity,
        ATOMIC_PER_CANDIDATE: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Append the ``keep`` entries of a tile to their queries' candidate buffers."""
        indices = offs_n[None, :] + tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.int32)
        if ATOMIC_PER_CANDIDATE:
            # One relaxed atomic per candidate: no scan over the tile, and there are only ~k·s
            # candidates per query in the whole memory. Done on flattened copies: Triton 3.8
            # cannot lay out a 2-D atomic on the matrix-product layout (compiler assertion).
            size: tl.constexpr = BLOCK_Q * BLOCK_N
            query_of = tl.reshape(tl.broadcast_to(offs_q[:, None], [BLOCK_Q, BLOCK_N]), [size])
            flat_keep = tl.reshape(keep, [size])
            ones = tl.full([size], 1, dtype=tl.int32)
            flat_slot = tl.atomic_add(counts_ptr + query_of, ones, mask=flat_keep, sem="relaxed")
            flat_store = flat_keep & (flat_slot < capacity)
            destination = query_of * capacity + flat_slot
            tl.store(
                out_values_ptr + destination, tl.reshape(similarities, [size]), mask=flat_store
            )
            tl.store(out_indices_ptr + destination, tl.reshape(indices, [size]), mask=flat_store)
        else:
            # One relaxed atomic per query row reserves its slots, a scan numbers them
            # (per-element atomics with the default acq_rel ordering were ~20x slower than a
            # memory read).
            kept = keep.to(tl.int32)
            row_kept = tl.sum(kept, axis=1)
            base = tl.atomic_add(counts_ptr + offs_q, row_kept, mask=row_kept > 0, sem="relaxed")
            slot = base[:, None] + tl.cumsum(kept, axis=1) - 1
            store = keep & (slot < capacity)
            destination = offs_q[:, None] * capacity + slot
            tl.store(out_values_ptr + destination, similarities, mask=store)
            tl.store(out_indices_ptr + destination, indices, mask=store)

    @triton.jit
    def _row_ok(
        valid_ptr, offs_n, first_row, num_rows,
        HAS_VALID: tl.constexpr, MASK_ROWS: tl.constexpr, EXCLUDE_REPEATS: tl.constexpr,
    ):  # fmt: skip
        """Which rows of a tile count: before the end (checked only where loads are masked,
        ``MASK_ROWS``), from the tile's first own row on (``EXCLUDE_REPEATS``: a last tile
        shifted back to end at the last row repeats rows of the tile before it) and, with a
        mask, written."""
        row_ok = tl.full([offs_n.shape[0]], 1, dtype=tl.int1)
        if MASK_ROWS:
            row_ok = offs_n < num_rows
        if EXCLUDE_REPEATS:
            row_ok = row_ok & (offs_n >= first_row)
        if HAS_VALID:
            if MASK_ROWS:
                written = tl.load(valid_ptr + offs_n, mask=row_ok, other=0)
            else:  # every row exists: an unmasked load, in vectors
                written = tl.load(valid_ptr + offs_n)
            row_ok = row_ok & (written != 0)
        return row_ok

    @triton.jit
    def _int8_scaled_products(
        query, query_low, rows, offs_n, num_rows, row_scale_ptr, MASK_ROWS: tl.constexpr
    ):
        """``(254·hi + lo)·σ_row`` of a tile: the int8 pre-filter's two int8 products (the
        queries' high parts and their residuals at 1/254 of the scale, int32 accumulation)
        combined in int32 (exact: |sum| < 2**30), converted once and scaled by each row's
        scale. Times the query's factor ``σ_q/254`` this is the approximate similarity."""
        if MASK_ROWS:
            row_scale = tl.load(row_scale_ptr + offs_n, mask=offs_n < num_rows, other=0.0)
        else:
            row_scale = tl.load(row_scale_ptr + offs_n)
        high = tl.dot(query, tl.trans(rows), out_dtype=tl.int32)
        low = tl.dot(query_low, tl.trans(rows), out_dtype=tl.int32)
        return (high * 254 + low).to(tl.float32) * row_scale[None, :]

    @triton.jit
    def _search_tile(
        query, rows, offs_q, offs_n, first_row, num_rows, bound, kept, keep_slots, valid_ptr,
        counts_ptr, out_values_ptr, out_indices_ptr, capacity, query_low, query_factor,
        query_norm, query_slack, query_gate, row_scale_ptr, row_error_ptr,
        HAS_VALID: tl.constexpr, COLLECT: tl.constexpr, ATOMIC_PER_CANDIDATE: tl.constexpr,
        SKIP_EMPTY_TILES: tl.constexpr, MASK_ROWS: tl.constexpr, EXCLUDE_REPEATS: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, INT8_ROWS: tl.constexpr,
        BOUND_BINS: tl.constexpr,
    ):  # fmt: skip
        """One tile's products: the collect pass appends its candidates, the bound pass updates
        ``kept`` (returned; unchanged by the collect pass): its largest tile maxima, or with
        ``BOUND_BINS`` the element-wise maxima of the tiles (``kept`` is then ``[BLOCK_Q,
        BLOCK_N]``).

        With ``INT8_ROWS`` (the int8 pre-filter) the exact similarity of query q and row r lies
        within ``‖q‖·e_r + slack_q`` of the approximation (``QuantizedRows``). The bound pass
        keeps tile maxima of lower bounds, taken with the largest row error (``query_gate`` =
        ``‖q‖·max e + slack_q``, per query: no per-row term in its loop), so the bound stays
        at or below the true k-th similarity. The collect pass gates a tile with that same
        largest error (``query_gate`` = the bound less it, over the query's factor, compared
        with the scaled products: one compare per element) and, on a tile that passes, keeps
        every row whose own upper bound reaches the bound, storing the approximation (the
        candidates are re-scored exactly afterwards)."""
        if INT8_ROWS:
            similarities = _int8_scaled_products(
                query, query_low, rows, offs_n, num_rows, row_scale_ptr, MASK_ROWS
            )
        else:
            similarities = tl.dot(query, tl.trans(rows))  # fp32 accumulation
        # Excluded rows (repeated, past the end, unwritten) must never be kept. Row masks are
        # [BLOCK_N], so the [BLOCK_Q, BLOCK_N] epilogue stays a few ops per element; padding
        # queries need no mask (their bound is +inf and their stores are masked). A query's own
        # row is not excluded here: fused_knn_search bounds one neighbour more and masks it after.
        if COLLECT:
            if SKIP_EMPTY_TILES:
                # Most tiles of a large memory hold no candidate of any query of the block (at
                # 14M rows ~89 %, at 1.28M only ~27 %: docs/results.md): one block-wide
                # reduction decides whether to number and store anything. It tests the raw
                # products: the row mask is loaded and applied only on a tile that passes,
                # which takes its loads and selects off the path every other tile runs
                # (benchmarks/kernel_resources.py).
                # Each query's largest product against its bound (int8: its largest scaled
                # product against its gate): a maximum per element and one compare per query.
                # (Triton 3.8 turns a test of every product into this itself; Triton 3.6 kept
                # a compare, a select and an integer maximum per element in the Gluon pass:
                # session 22.) (tl.max ignores NaN, as a test per product does.)
                gate = bound
                if INT8_ROWS:
                    gate = query_gate
                passes = tl.max(similarities, axis=1) >= gate
                append = tl.max(passes.to(tl.int32), axis=0) > 0
            else:  # masked-off atomics and stores cost no memory traffic: skip the reduction
                append = True
            if append:
                keep = similarities >= bound[:, None]  # (int8: replaced below)
                row_ok = _row_ok(
                    valid_ptr, offs_n, first_row, num_rows, HAS_VALID, MASK_ROWS, EXCLUDE_REPEATS
                )
                if INT8_ROWS:  # each row's own error bound, on this (rarer) path only
                    if MASK_ROWS:
                        row_error = tl.load(row_error_ptr + offs_n, mask=offs_n < num_rows,
                                            other=0.0)  # fmt: skip
                    else:
                        row_error = tl.load(row_error_ptr + offs_n)
                    similarities = similarities * query_factor[:, None]
                    upper = similarities + (
                        query_norm[:, None] * row_error[None, :] + query_slack[:, None]
                    )
                    keep = upper >= bound[:, None]
                _append_candidates(
                    similarities, keep & row_ok[None, :], offs_q, offs_n, counts_ptr,
                    out_values_ptr, out_indices_ptr, capacity, ATOMIC_PER_CANDIDATE,
                    BLOCK_Q, BLOCK_N,
                )  # fmt: skip
        elif BOUND_BINS:
            # Per query, the largest product at each position of the tile over this program's
            # tiles: bins of disjoint rows (an element-wise maximum, no reduction across the
            # tile; int8 lower bounds are taken once, after the loop).
            row_ok = _row_ok(
                valid_ptr, offs_n, first_row, num_rows, HAS_VALID, MASK_ROWS, EXCLUDE_REPEATS
            )
            kept = tl.maximum(kept, tl.where(row_ok[None, :], similarities, float("-inf")))
        else:
            # A select after the product, not a -inf bias added to it: Triton folds such a bias
            # into the wgmma accumulator's initial value, and with a branch after the product
            # ptxas then serialises its wgmma instructions (C7520, session 9).
            row_ok = _row_ok(
                valid_ptr, offs_n, first_row, num_rows, HAS_VALID, MASK_ROWS, EXCLUDE_REPEATS
            )
            similarities = tl.where(row_ok[None, :], similarities, float("-inf"))
            tile_max = tl.max(similarities, axis=1)
            if INT8_ROWS:  # the lower bound of the tile's largest approximation (factor >= 0)
                tile_max = tl.where(
                    tile_max > float("-inf"), tile_max * query_factor - query_gate, tile_max
                )
            # A larger tile maximum replaces the smallest kept one.
            smallest = tl.min(kept, axis=1)
            slot = tl.argmin(kept, axis=1)
            replace = (keep_slots[None, :] == slot[:, None]) & (tile_max > smallest)[:, None]
            kept = tl.where(replace, tile_max[:, None], kept)
        return kept

    @triton.jit
    def _knn_tiles_kernel(
        query_ptr,
        memory_ptr,
        valid_ptr,
        bound_ptr,
        tile_max_ptr,
        out_values_ptr,
        out_indices_ptr,
        counts_ptr,
        query_low_ptr,
        query_terms_ptr,
        row_scale_ptr,
        row_error_ptr,
        num_queries,
        num_rows,
        dim,
        stride_query,
        stride_memory,
        stride_bound,
        num_tiles,
        tile_step,
        capacity,
        bound_columns,
        HAS_VALID: tl.constexpr,
        COLLECT: tl.constexpr,
        WIDEN_BOUND: tl.constexpr,
        ATOMIC_PER_CANDIDATE: tl.constexpr,
        SKIP_EMPTY_TILES: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BOUND_KEEP: tl.constexpr,
        TMA_LOADS: tl.constexpr,
        EVEN_D: tl.constexpr,
        SHIFT_LAST_TILE: tl.constexpr,
        EXCLUDE_REPEATS: tl.constexpr,
        QUERY_DTYPE: tl.constexpr = None,
        INT8_ROWS: tl.constexpr = False,
        BOUND_BINS: tl.constexpr = False,
    ):
        # Program (q, p) owns queries [q*BLOCK_Q, ...) and tiles p, p + P, p + 2P, ... so that the
        # programs of all query blocks read the same memory tile at about the same time (L2 hits).
        pid_q = tl.program_id(0)
        pid_n = tl.program_id(1)
        programs_n = tl.num_programs(1)
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_mask = offs_q < num_queries
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < dim
        query = tl.load(
            query_ptr + offs_q[:, None] * stride_query + offs_d[None, :],
            mask=q_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if QUERY_DTYPE is not None:
            # fp32 queries rounded here (to nearest even, as torch's .to): a product operand
            # computed in the kernel stays in registers, one loaded as is goes to shared memory
            # and is read from there again for every tile (config.query_operand).
            query = query.to(QUERY_DTYPE)
        if INT8_ROWS:
            # The int8 pre-filter (QuantizedRows): the query in two int8 parts (high, and the
            # rounding residual at 1/254 of its scale) and four fp32 terms per query.
            query_low = tl.load(
                query_low_ptr + offs_q[:, None] * stride_query + offs_d[None, :],
                mask=q_mask[:, None] & d_mask[None, :],
                other=0,
            )
            if QUERY_DTYPE is not None:  # int16 parts narrowed here: operands in registers
                query_low = query_low.to(QUERY_DTYPE)
            terms_ptrs = query_terms_ptr + offs_q
            query_factor = tl.load(terms_ptrs, mask=q_mask, other=0.0)
            query_norm = tl.load(terms_ptrs + num_queries, mask=q_mask, other=0.0)
            query_slack = tl.load(terms_ptrs + 2 * num_queries, mask=q_mask, other=0.0)
            query_gate = tl.load(terms_ptrs + 3 * num_queries, mask=q_mask, other=0.0)
        else:  # (unused)
            query_low = query
            query_factor = 0.0
            query_norm = 0.0
            query_slack = 0.0
            query_gate = 0.0
        bound = tl.full([BLOCK_Q], float("inf"), dtype=tl.float32)
        if COLLECT:
            bound = tl.load(bound_ptr + offs_q * stride_bound, mask=q_mask, other=float("inf"))
            if WIDEN_BOUND:
                # The bound pass's k-th largest tile maximum, lowered by 2**-20 of itself: the
                # two passes may round the same product differently by an ulp. Fewer than k
                # sampled candidates (-inf): the lowest finite value, which collects every
                # candidate but never an excluded (-inf) row. Padding queries keep +inf.
                finite = tl.abs(bound) < float("inf")
                finite_bound = tl.where(finite, bound, 0.0)  # (no inf - inf computed)
                widened = tl.where(finite, finite_bound - tl.abs(finite_bound) * 9.5367431640625e-07,
                                   -3.4028234663852886e38)  # fmt: skip
                bound = tl.where(q_mask, widened, float("inf"))
            if INT8_ROWS:
                # The tile gate in units of the scaled products: (bound - ‖q‖·max e - slack) /
                # factor, lowered by 2**-20 of itself for the division's rounding; a zero query
                # (factor 0) passes every tile (its search then overflows to the exact scan).
                # Computed from finite values (padding queries' +inf bound, the lowest finite
                # one held at -1e30: far below every product, and no overflow).
                numerator = tl.where(q_mask, tl.maximum(bound - query_gate, -1.0e30), 0.0)
                gate = numerator / tl.where(query_factor > 0, query_factor, 1.0)
                gate = gate - tl.abs(gate) * 9.5367431640625e-07
                gate = tl.where(query_factor > 0, gate, float("-inf"))
                query_gate = tl.where(q_mask, gate, float("inf"))  # padding: never appends
        # The BOUND_KEEP largest tile maxima this program saw, per query (-inf: none yet; the
        # collect pass keeps none).
        kept = tl.full([BLOCK_Q, BOUND_KEEP], float("-inf"), dtype=tl.float32)
        keep_slots = tl.arange(0, BOUND_KEEP)
        # No row-end masks in the loop: with at least BLOCK_N rows (SHIFT_LAST_TILE) a partial
        # last tile is shifted back to end at the last row, and the rows it repeats are
        # excluded by the row mask (from its first own row on), which the collect pass applies
        # only on a tile with a candidate. (A separate masked tail tile cost the loop
        # registers: larger tiles spilled.) Smaller memories and bulk copies keep row-end masks.
        tile_offsets = tl.arange(0, BLOCK_N)
        if not TMA_LOADS:  # int64 offsets: rows × dim passes 2**31 beyond ~16M 128-d rows
            tile_ptrs = (
                memory_ptr + tile_offsets.to(tl.int64)[:, None] * stride_memory + offs_d[None, :]
            )
        for tile in range(pid_n, num_tiles, programs_n):
            first_row = tile * tile_step * BLOCK_N
            row_start = first_row
            if SHIFT_LAST_TILE:
                row_start = tl.minimum(first_row, num_rows - BLOCK_N)
            offs_n = row_start + tile_offsets
            if TMA_LOADS:  # memory_ptr is a tensor descriptor: Hopper's bulk copy, zero padding
                rows = memory_ptr.load([row_start, 0])
            else:
                row_ptrs = tile_ptrs + row_start.to(tl.int64) * stride_memory
                if not SHIFT_LAST_TILE:
                    rows = tl.load(row_ptrs, mask=(offs_n < num_rows)[:, None] & d_mask[None, :],
                                   other=0.0)  # fmt: skip
                elif EVEN_D:  # dim == BLOCK_D: no mask for the loop to evaluate
                    rows = tl.load(row_ptrs)
                else:
                    rows = tl.load(row_ptrs, mask=d_mask[None, :], other=0.0)
            kept = _search_tile(
                query, rows, offs_q, offs_n, first_row, num_rows, bound, kept, keep_slots,
                valid_ptr, counts_ptr, out_values_ptr, out_indices_ptr, capacity, query_low,
                query_factor, query_norm, query_slack, query_gate, row_scale_ptr, row_error_ptr,
                HAS_VALID, COLLECT,
                ATOMIC_PER_CANDIDATE, SKIP_EMPTY_TILES, not SHIFT_LAST_TILE, EXCLUDE_REPEATS,
                BLOCK_Q, BLOCK_N, INT8_ROWS, BOUND_BINS,
            )  # fmt: skip
        if not COLLECT:
            if BOUND_BINS and INT8_ROWS:  # lower bounds of the bins' scaled products (factor >= 0)
                kept = tl.where(kept > float("-inf"),
                                kept * query_factor[:, None] - query_gate[:, None], kept)  # fmt: skip
            columns = pid_n * BOUND_KEEP + keep_slots
            tl.store(
                tile_max_ptr + offs_q[:, None] * bound_columns + columns[None, :],
                kept,
                mask=q_mask[:, None],
            )


if triton is not None:

    @triton.jit
    def _flip_negative_magnitudes(bits):
        """fp32 bits (as int32) ↔ int32 keys that order like the floats, as signed integers:
        a negative value has its magnitude bits flipped. The map is its own inverse (the sign
        bit is kept), so it turns keys back into float bits too."""
        return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)

    @triton.jit
    def _ordered_key(values):
        """int32 keys that order like the fp32 ``values`` (as signed integers)."""
        return _flip_negative_magnitudes(values.to(tl.int32, bitcast=True))

    @triton.jit
    def _key_value(keys):
        """The fp32 values of :func:`_ordered_key`'s keys."""
        return _flip_negative_magnitudes(keys).to(tl.float32, bitcast=True)

    @triton.jit
    def _kth_largest_kernel(values_ptr, out_ptr, columns, stride_row, k, BLOCK: tl.constexpr):
        """``out[row]``: the ``k``-th largest of ``values[row, :columns]``, by a 32-step radix
        select on order-preserving keys (the largest key t with at least k keys >= t)."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        values = tl.load(
            values_ptr + row.to(tl.int64) * stride_row + offs,
            mask=offs < columns,
            other=float("-inf"),
        )
        # Unsigned keys (the sign bit flipped), so that bits are set from the top down.
        keys = (_ordered_key(values) ^ -2147483648).to(tl.uint32, bitcast=True)
        threshold = tl.zeros([], dtype=tl.uint32)
        for bit in tl.static_range(31, -1, -1):
            trial = threshold | (1 << bit)
            count = tl.sum((keys >= trial).to(tl.int32), axis=0)
            threshold = tl.where(count >= k, trial, threshold)
        key = threshold.to(tl.int32, bitcast=True) ^ -2147483648
        tl.store(out_ptr + row, _key_value(key))

    @triton.jit
    def _select_sorted(
        values_ptr, indices_ptr, query_ids_ptr, out_values_ptr, out_indices_ptr, row, count,
        capacity, k, HAS_IDS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """:func:`_select_candidates_kernel`'s sort over the first ``BLOCK`` slots of ``row``
        (``count <= BLOCK`` and ``k <= BLOCK``)."""
        offs = tl.arange(0, BLOCK)
        filled = offs < count
        base = row.to(tl.int64) * capacity
        values = tl.load(values_ptr + base + offs, mask=filled, other=float("-inf"))
        if HAS_IDS:
            rows = tl.load(indices_ptr + base + offs, mask=filled, other=-1)
            values = tl.where(rows == tl.load(query_ids_ptr + row), float("-inf"), values)
        packed = (_ordered_key(values).to(tl.int64) << 32) | offs.to(tl.int64)
        ordered = tl.sort(packed, descending=True)
        slots = (ordered & 0xFFFFFFFF).to(tl.int32)
        best = _key_value((ordered >> 32).to(tl.int32))
        found = (offs < k) & (best > float("-inf"))
        best_rows = tl.load(indices_ptr + base + slots, mask=found, other=-1)
        tl.store(out_values_ptr + row.to(tl.int64) * k + offs, best, mask=offs < k)
        tl.store(out_indices_ptr + row.to(tl.int64) * k + offs, best_rows, mask=offs < k)

    @triton.jit
    def _select_candidates_kernel(
        values_ptr, indices_ptr, counts_ptr, query_ids_ptr, out_values_ptr, out_indices_ptr,
        capacity, k, HAS_IDS: tl.constexpr, BLOCK: tl.constexpr, SMALL_BLOCK: tl.constexpr,
    ):  # fmt: skip
        """The ``k`` largest of a query's ``counts[row]`` candidates (its own row, with
        ``query_ids``, left out), sorted descending, with their memory rows; -inf / -1 where it
        has fewer. One program per query: the candidates' keys and slots, packed into int64,
        are sorted in registers, over ``SMALL_BLOCK`` slots when the query has no more
        candidates than that (the usual case: the buffer has room for ~4x the expected count,
        and a sort's work grows faster than its length), else over ``BLOCK``."""
        row = tl.program_id(0)
        count = tl.minimum(tl.load(counts_ptr + row), capacity)
        if SMALL_BLOCK < BLOCK:
            if count <= SMALL_BLOCK:
                _select_sorted(values_ptr, indices_ptr, query_ids_ptr, out_values_ptr,
                               out_indices_ptr, row, count, capacity, k, HAS_IDS, SMALL_BLOCK)
            else:
                _select_sorted(values_ptr, indices_ptr, query_ids_ptr, out_values_ptr,
                               out_indices_ptr, row, count, capacity, k, HAS_IDS, BLOCK)
        else:
            _select_sorted(values_ptr, indices_ptr, query_ids_ptr, out_values_ptr,
                           out_indices_ptr, row, count, capacity, k, HAS_IDS, BLOCK)


if triton is not None:

    @triton.jit
    def _rescore_candidates_kernel(
        values_ptr, indices_ptr, counts_ptr, query_ptr, memory_ptr, capacity, dim, stride_query,
        stride_memory, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """The int8 pre-filter's candidates re-scored: program ``(q, p)`` of ``P`` replaces the
        approximate similarities in slots ``[c·BLOCK_C, (c+1)·BLOCK_C)``, c = p, p + P, …, of
        query ``q``'s buffer, up to its count, by exact ones: the query in the memory's dtype
        times the gathered bf16/fp16 row, accumulated in fp32 (the similarity every path
        computes). A loop up to the count, not a program per slot chunk: most of the buffer
        is empty."""
        row = tl.program_id(0)
        programs = tl.num_programs(1)
        count = tl.minimum(tl.load(counts_ptr + row), capacity)
        base = row.to(tl.int64) * capacity
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < dim
        query = tl.load(query_ptr + row.to(tl.int64) * stride_query + offs_d, mask=d_mask,
                        other=0.0).to(tl.float32)  # fmt: skip
        for first in range(tl.program_id(1) * BLOCK_C, count, programs * BLOCK_C):
            offs = first + tl.arange(0, BLOCK_C)
            filled = offs < count
            rows = tl.load(indices_ptr + base + offs, mask=filled, other=0)
            gathered = tl.load(
                memory_ptr + rows[:, None] * stride_memory + offs_d[None, :],
                mask=filled[:, None] & d_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            exact = tl.sum(gathered * query[None, :], axis=1)
            tl.store(values_ptr + base + offs, exact, mask=filled)


if triton is not None:

    @triton.jit
    def _write_quantized_rows_kernel(
        rows_ptr, positions_ptr, values_ptr, scales_ptr, errors_ptr, norm_bound_ptr,
        error_bound_ptr, dim, stride_rows, stride_values, ERROR_MARGIN: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """One row of :meth:`QuantizedRows.write_` per program, as its PyTorch path computes it
        (the same scale and int8 values; the error norm summed in another order, within the
        margin): int8 values and scale at ``positions[i]``, the error bound, and the copy's two
        running bounds raised by atomic maxima (non-negative floats)."""
        i = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        in_row = offs < dim
        row = tl.load(rows_ptr + i * stride_rows + offs, mask=in_row, other=0.0).to(tl.float32)
        scale = tl.div_rn(tl.max(tl.abs(row), axis=0), 127.0)
        safe = tl.where(scale > 0, scale, 1.0)
        values = tl.floor(tl.div_rn(row, safe) + 0.5)
        values = tl.minimum(tl.maximum(values, -127.0), 127.0)
        residual = row - values * scale
        error = tl.sqrt_rn(tl.sum(residual * residual, axis=0)) * ERROR_MARGIN
        norm = tl.sqrt_rn(tl.sum(row * row, axis=0))
        position = tl.load(positions_ptr + i)
        tl.store(values_ptr + position * stride_values + offs, values.to(tl.int8), mask=in_row)
        tl.store(scales_ptr + position, scale)
        tl.store(errors_ptr + position, error)
        tl.atomic_max(norm_bound_ptr, norm + error)
        tl.atomic_max(error_bound_ptr, error)


# Safety factor on the pre-filter's error norms (their fp32 computation rounds) and fp32
# slack per feature dimension, relative to ‖q‖·(‖row‖ + e): covers the kernel's rounding of the
# scaled int8 products and the order in which fp32 sums of the exact similarity are taken
# (d·2^-24 relative each), with a margin of 4.
_ERROR_MARGIN = 1.0 + 2.0**-8
_FP32_SLACK_PER_DIM = 2.0**-22


@dataclass(frozen=True)
class QuantizedRows:
    """An int8 copy of a bf16/fp16 memory that the fused search reads as an exact pre-filter.

    Row ``r`` is ``scales[r] · values[r] + e_r`` with ``‖e_r‖ <= errors[r]``; ``norm_bound``
    (0-d) bounds ``‖row‖ + errors[r]`` and ``error_bound`` (0-d) bounds ``errors[r]`` over all
    rows. The search's collect pass reads half the bytes (128-d: 128 B + 8 B per row instead of
    256 B) and computes each similarity from two int8 products (the query's high part and its
    rounding residual), with a rigorous error bound: it keeps every row whose upper bound
    reaches the bound (a bound pass reading the copy too takes lower bounds), and the
    candidates are re-scored exactly from the bf16/fp16 memory. The neighbours are those of
    the exact search; only the number of candidates grows (1.3-1.4x on random unit rows with
    the default bf16 bound pass: ``benchmarks/search_candidates.py --int8``).

    Build it with :meth:`from_memory` and keep it in step with :meth:`write_` (or let
    :class:`look.memory.FeatureMemory` with ``int8_prefilter=True`` do both).
    """

    values: Tensor  # (N, d) int8
    scales: Tensor  # (N,) fp32
    errors: Tensor  # (N,) fp32
    norm_bound: Tensor  # () fp32
    error_bound: Tensor  # () fp32

    @staticmethod
    def quantize(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(values, scales, errors)`` of ``rows`` ``(n, d)``: a scale per row (its largest
        magnitude over 127; 0 for a zero row) and the rounding error's norm, with margin."""
        rows = rows.float()
        # Divided by a tensor (filled on the device: no copy, no host wait): on CUDA, PyTorch
        # divides by a Python scalar as a product with its reciprocal, 1 ulp off the kernel's
        # correctly rounded division in ~1 % of rows (seen on an H200), which changed some of
        # those rows' int8 values.
        largest = rows.abs().amax(dim=1)
        scales = largest / largest.new_full((), 127.0)
        safe = torch.where(scales > 0, scales, 1.0)
        # Rounded half up (floor(x + 0.5)), as the GPU's write kernel rounds: the same copy
        # on both paths (any rounding keeps the bound: errors are measured after it).
        values = torch.floor(rows / safe.unsqueeze(1) + 0.5).clamp_(-127, 127)
        errors = (rows - values * scales.unsqueeze(1)).norm(dim=1) * _ERROR_MARGIN
        return values.to(torch.int8), scales, errors

    @classmethod
    @torch.no_grad()
    def from_memory(cls, memory: Tensor, *, chunk_rows: int = 1 << 20) -> QuantizedRows:
        """The int8 copy of a whole ``(N, d)`` memory (as stored: quantize the rounded rows), built
        ``chunk_rows`` at a time (fp32 temporaries of a 14M-row bank would take ~15 GB)."""
        rows, dim = memory.shape
        device = memory.device
        copy = cls(
            torch.empty(rows, dim, dtype=torch.int8, device=device),
            torch.empty(rows, dtype=torch.float32, device=device),
            torch.empty(rows, dtype=torch.float32, device=device),
            torch.zeros((), dtype=torch.float32, device=device),
            torch.zeros((), dtype=torch.float32, device=device),
        )
        for start in range(0, rows, chunk_rows):
            positions = slice(start, min(start + chunk_rows, rows))
            copy.write_(positions, memory[positions].detach())  # type: ignore[arg-type]
        return copy

    @torch.no_grad()
    def write_(self, positions: Tensor | slice, rows: Tensor) -> None:
        """Copy ``rows`` (as stored in the memory, ``(n, d)``) into ``positions`` (no host wait:
        ``norm_bound`` and ``error_bound`` are raised in place, never lowered, so they stay
        bounds). On a GPU one Triton kernel does it (a bank's write every step: one launch
        instead of ~24 small operations); elsewhere, or if that kernel fails, PyTorch."""
        if rows.is_cuda and len(rows) and triton is not None and not _WRITE_FALLBACK.failed:
            if isinstance(positions, slice):
                positions = torch.arange(
                    *positions.indices(self.values.shape[0]), device=rows.device
                )
            try:
                _write_quantized_rows(self, positions, rows)
                return
            except Exception as error:  # any kernel failure: warn once, write with PyTorch
                _WRITE_FALLBACK.fail(error, stacklevel=3)
        values, scales, errors = self.quantize(rows)
        self.values[positions] = values
        self.scales[positions] = scales
        self.errors[positions] = errors
        if len(rows):
            torch.maximum(
                self.norm_bound, (rows.float().norm(dim=1) + errors).max(), out=self.norm_bound
            )
            torch.maximum(self.error_bound, errors.max(), out=self.error_bound)

    def matches(self, memory: Tensor) -> bool:
        """Whether this copy has ``memory``'s shape and device."""
        return self.values.shape == memory.shape and self.values.device == memory.device


_WRITE_FALLBACK = KernelFallback(
    "the int8 copy's write kernel",
    "writing it with PyTorch instead (the same copy, more kernels per write)",
)


def _write_quantized_rows(copy: QuantizedRows, positions: Tensor, rows: Tensor) -> None:
    """:meth:`QuantizedRows.write_` in one Triton kernel (a program per row; the two bounds
    raised by atomic maxima)."""
    rows = rows.contiguous()
    _write_quantized_rows_kernel[(rows.shape[0],)](
        rows, positions.to(torch.int64).contiguous(), copy.values, copy.scales, copy.errors,
        copy.norm_bound, copy.error_bound, rows.shape[1], rows.stride(0),
        copy.values.stride(0), ERROR_MARGIN=_ERROR_MARGIN,
        BLOCK_D=max(16, _next_power_of_two(rows.shape[1])),
    )  # fmt: skip


def _quantize_queries(queries: Tensor, copy: QuantizedRows) -> tuple[Tensor, Tensor, Tensor]:
    """The pre-filter's queries, for queries already rounded to the memory's dtype: int8 high
    parts quantised as the rows are (:meth:`QuantizedRows.quantize`: scale ``σ_q`` = largest
    magnitude / 127), int8 residual parts at ``σ_q/254`` (the
    kernel adds them in int32 as ``254·hi + lo``), and ``(4, B)`` fp32 terms: the factor
    ``σ_q/254``, ``‖q‖`` (with margin), the slack ``‖e_q‖·norm_bound`` plus fp32 rounding, and
    the slack with the largest row error, ``‖q‖·error_bound + slack`` (``copy``'s bounds)."""
    queries = queries.float()
    high, scale_high, _ = QuantizedRows.quantize(queries)  # the high parts: as the rows
    factor = scale_high / 254.0
    residual = queries - high.float() * scale_high.unsqueeze(1)  # |·| <= σ_q / 2: fits in ±127
    low = torch.round(residual / torch.where(factor > 0, factor, 1.0).unsqueeze(1))
    low = low.clamp_(-127, 127)
    query_norms = queries.norm(dim=1) * _ERROR_MARGIN
    residual_norms = (residual - low * factor.unsqueeze(1)).norm(dim=1)
    fp32_slack = (queries.shape[1] + 8) * _FP32_SLACK_PER_DIM
    slack = (residual_norms * _ERROR_MARGIN + fp32_slack * query_norms) * copy.norm_bound
    widest = query_norms * copy.error_bound + slack
    terms = torch.stack([factor, query_norms, slack, widest])
    return high, low.to(torch.int8), terms.contiguous()


_RESCORE_BLOCK = 64  # candidate slots per iteration of the re-scoring kernel


def _rescore_candidates(
    values: Tensor, indices: Tensor, counts: Tensor, queries: Tensor, memory: Tensor
) -> None:
    """Replace the pre-filter's candidate similarities in ``values`` by exact ones, in place."""
    batch, capacity = values.shape
    # 8 programs per query: ~2 chunks each for the ~1,100 candidates of a 14.2M-row bank
    programs = max(1, min(8, _cdiv(capacity, _RESCORE_BLOCK)))
    _rescore_candidates_kernel[(batch, programs)](
        values, indices, counts, queries, memory, capacity, memory.shape[1], queries.stride(0),
        memory.stride(0), BLOCK_C=_RESCORE_BLOCK,
        BLOCK_D=max(16, _next_power_of_two(memory.shape[1])), num_warps=4,
    )  # fmt: skip


def check_pair_release(tile_pairs: bool, pair_release: bool, stages: int) -> None:
    """``ValueError`` unless a Gluon collect pass that frees its ring's buffers a pair at a time
    also takes its tiles in pairs over an even ring (a config's fields, or
    :func:`look.search_gluon.gluon_collect_pass`'s arguments)."""
    if pair_release and (not tile_pairs or stages % 2):
        raise ValueError(
            "pair_release frees the ring's buffers a pair at a time (a config's "
            "gluon_pair_release): it needs tile pairs (gluon_tile_pairs) and an even number of "
            f"buffers (num_stages), got tile pairs {tile_pairs}, {stages} buffers"
        )


@dataclass(frozen=True)
class SearchKernelConfig:
    """Tile sizes and launch settings of the search kernel (``block_q`` is capped by the batch)."""

    block_q: int = 64
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 4
    # How the bound and the final k are picked: "fused" (two Triton kernels: a radix select of
    # the bound, a sort of each query's candidates in registers), or PyTorch's "sort" / "topk".
    select: str = "fused"
    # How the collect pass numbers its candidates: "scan" (one atomic per query row and tile,
    # then a prefix sum over the tile) or "atomic" (one atomic per candidate, no prefix sum;
    # faster at every size of the second H100 tuning, docs/results.md).
    collect: str = "atomic"
    # Largest s of the bound pass (every s-th tile): a larger s makes that pass and its selection
    # cheaper (14M rows: 111k tile maxima per query at s = 4) but the bound looser, so more
    # candidates reach the collect buffer, which grows with s.
    tile_stride: int = 4
    # Test each tile for any candidate before numbering and storing (a block-wide reduction);
    # without it, the masked atomics and stores run on every tile.
    skip_empty_tiles: bool = True
    # How memory tiles reach shared memory: "pointer" (asynchronous copies of 16-byte vectors,
    # any GPU) or "tma" (Hopper's tensor-memory accelerator through a tensor descriptor: one
    # bulk copy per tile, fewer instructions and registers per load; rows that are not 16-byte
    # aligned fall back to pointer loads).
    loads: str = "pointer"
    # Where the product's query operand lives: "shared" (loaded in the memory's dtype; Hopper's
    # wgmma then reads it from shared memory for every tile, twice the bytes of the 32-row
    # memory tile) or "registers" (fp32 queries rounded in the kernel: Triton keeps a computed
    # operand in registers, ~25 more per thread). Session 12's Nsight Compute run found the
    # default's passes at 77-83 % of L1/shared-memory throughput, their busiest unit; on the
    # H100 "registers" was slower at 14.2M rows and faster at 1.28M with 3 stages.
    query_operand: str = "shared"
    # With an int8 pre-filter (QuantizedRows): whether the bound pass reads it too (True) or the
    # bf16/fp16 rows (False): a tight bound, so the int8 collect pass keeps 40-48 % fewer
    # candidates and appends to fewer tiles (random rows, s = 4: 1,067 against 1,790 per query
    # at 1.28M rows, 1,121 against 2,138 at 14.2M; benchmarks/search_candidates.py --int8),
    # for the bound pass's 1/s of the bank read at full width.
    int8_bound_pass: bool = False
    # Which kernels run the two passes: "triton" (the kernel above, any GPU from sm_80) or
    # "gluon" (look.search_gluon: warp-specialised for Hopper, a producer warp bulk-copying
    # ``block_n``-row tiles into ``num_stages`` buffers for ``gluon_groups`` consumer
    # warpgroups of 64 queries each, which share every tile; elsewhere, and with the int8
    # pre-filter, the Triton passes run with these tiles). The selections are the same.
    kernel: str = "triton"
    gluon_groups: int = 4
    # The Gluon collect pass's consumers take their tiles in pairs (two per turn of the loop,
    # each verdict in its own shared allocation): Triton's barrier analysis then leaves two
    # warpgroup barriers per tile instead of three (the SASS under Triton 3.6, session 23).
    # The same candidates; not yet timed on a GPU.
    gluon_tile_pairs: bool = False
    # With tiles in pairs: the ring's buffers freed a pair at a time (one arrival per pair, and
    # the barrier the analysis puts after it): 1.5 barriers per tile under Triton 3.6.
    gluon_pair_release: bool = False

    def __post_init__(self) -> None:
        # Refused when the config is made, not at its first search on a Hopper GPU.
        if (self.gluon_tile_pairs or self.gluon_pair_release) and self.kernel != "gluon":
            raise ValueError("gluon_tile_pairs and gluon_pair_release apply to kernel='gluon'")
        check_pair_release(self.gluon_tile_pairs, self.gluon_pair_release, self.num_stages)
    # The bound pass's summary per program and query: its largest tile maxima (False), or
    # (True) the largest product at each of the ``block_n`` positions of its tiles, bins of
    # disjoint rows as in the Gluon bound pass: an element-wise maximum per tile instead of a
    # reduction across it and a sorted list (``block_n`` columns per program for the bound's
    # selection).
    bound_bins: bool = False


# Candidates tried by tune_kernel_config; the default off Hopper is the first (on Hopper,
# HOPPER_CONFIG below). Session 12's second H100 run (docs/results.md), with the candidates'
# sort over a quarter of the buffer: the default's
# tiles with s = 4 were the fastest at 1.28M and 14.2M rows (0.99 and 4.04 ms, against 1.01 and
# 4.23 with s = 2; the traced step's two passes took 0.55 ms against s = 2's 0.62 in the first
# run); s = 2 was the fastest for a sharded rank of 1.77M rows and 2,048 queries. Pointer loads
# work on any GPU. Configs that were 1.55x the fastest or slower at every size of the first run
# were dropped (the list of session 11 is in git history).
KERNEL_CONFIGS = (
    SearchKernelConfig(64, 32, 4, 4, "fused", "atomic"),
    SearchKernelConfig(64, 32, 4, 4, "fused", "atomic", tile_stride=2),
    SearchKernelConfig(64, 32, 4, 4, "sort", "scan"),
    SearchKernelConfig(128, 32, 4, 3, "sort", "scan"),
    SearchKernelConfig(64, 32, 4, 4, "topk", "scan"),
    SearchKernelConfig(128, 64, 4, 3, "sort", "atomic"),
    SearchKernelConfig(64, 64, 4, 4, "sort", "atomic"),
    SearchKernelConfig(128, 128, 8, 3, "sort", "atomic"),
    SearchKernelConfig(64, 32, 4, 4, "topk", "atomic", tile_stride=16),
    SearchKernelConfig(64, 32, 4, 4, "sort", "atomic", skip_empty_tiles=False),
    SearchKernelConfig(128, 64, 4, 3, "sort", "atomic", skip_empty_tiles=False),
    SearchKernelConfig(64, 32, 4, 4, "sort", "scan", tile_stride=2),
    SearchKernelConfig(32, 64, 4, 3, "sort", "atomic"),
    # Fewer stages, more resident blocks: sm_90 fits 5 blocks of the 2-stage atomic collect pass
    # per SM (94 registers, 40 KB shared) against 3 of the default (145 registers, 56 KB).
    SearchKernelConfig(64, 32, 4, 2, "sort", "atomic"),
    SearchKernelConfig(64, 32, 4, 3, "sort", "atomic"),
    # Tensor-descriptor (TMA) loads on Hopper (compiled for sm_90 in CI; on the H100 the 3-stage
    # atomic one was the fastest config at 14.2M rows, not at 1.28M).
    SearchKernelConfig(64, 32, 4, 4, "sort", "scan", loads="tma"),
    SearchKernelConfig(64, 32, 4, 3, "sort", "atomic", loads="tma"),
    SearchKernelConfig(64, 32, 4, 2, "sort", "atomic", loads="tma"),
    SearchKernelConfig(128, 64, 4, 3, "sort", "atomic", loads="tma"),
    # Session 9's larger tiles with one warpgroup (4 warps) or two: a warpgroup then holds two
    # or four 64-row products, ~200 registers, and an SM runs 1-2 blocks, 4-8 warps.
    SearchKernelConfig(256, 32, 8, 3, "fused", "atomic"),
    SearchKernelConfig(128, 32, 4, 3, "fused", "atomic"),
    # Session 12: each 64-query block reads the whole bank through L2 (4x the bank for 256
    # queries: ~14.5 GB in the 3.2 ms collect pass at 14.2M rows, ~4.5 TB/s). One warpgroup per
    # 64 queries keeps the default's registers per thread and warps per SM while a block of
    # 128 or 256 queries reads each tile once for all of them. (Slower than the default at every
    # size of session 12's H100 runs: 256 queries per block were latency-bound.)
    SearchKernelConfig(128, 32, 8, 4, "fused", "atomic", tile_stride=2),
    SearchKernelConfig(128, 32, 8, 4, "fused", "atomic"),
    SearchKernelConfig(256, 32, 16, 3, "fused", "atomic", tile_stride=2),
    SearchKernelConfig(256, 32, 16, 3, "fused", "atomic"),
    SearchKernelConfig(128, 64, 8, 3, "fused", "atomic", tile_stride=2),
    # The default's tiles with PyTorch's selection (the default until session 10).
    SearchKernelConfig(64, 32, 4, 4, "sort", "atomic"),
    # Session 12: the query operand in registers (fp32 queries rounded in the kernel), so that
    # shared memory serves only the memory tiles; ~25 more registers per thread: 3 collect
    # blocks per SM instead of 4 with 4 warps. On the H100: 4.70-5.08 ms at 14.2M rows against
    # the default's 4.01; the 3-stage one 0.84 ms at 1.28M against 1.01.
    SearchKernelConfig(64, 32, 4, 4, "fused", "atomic", query_operand="registers"),
    SearchKernelConfig(64, 32, 4, 4, "fused", "atomic", tile_stride=2, query_operand="registers"),
    SearchKernelConfig(64, 32, 4, 3, "fused", "atomic", query_operand="registers"),
    SearchKernelConfig(64, 64, 4, 3, "fused", "atomic", query_operand="registers"),
    SearchKernelConfig(128, 32, 8, 4, "fused", "atomic", query_operand="registers"),
    # A bound pass over every 8th tile (half of s = 4's) with a buffer of 6,432 slots per query
    # (~1,620 candidates at 14.2M rows), sorted in registers since session 12.
    SearchKernelConfig(64, 32, 4, 4, "fused", "atomic", tile_stride=8),
    # The default with bulk (TMA) copies: Nsight Compute found L1/TEX the busiest unit of both
    # passes, and a bulk copy bypasses the per-thread 16-byte copies that go through it (the
    # TMA configs above were timed only with torch.sort selections).
    SearchKernelConfig(64, 32, 4, 4, "fused", "atomic", loads="tma"),
    SearchKernelConfig(64, 32, 4, 3, "fused", "atomic", loads="tma"),
    # Session 13: with an int8 pre-filter, the bound pass reading it too (half its bytes, a
    # bound looser by the largest row error's slack; the other configs read bf16 rows there).
    SearchKernelConfig(64, 32, 4, 4, "fused", "atomic", int8_bound_pass=True),
    # Session 14: both passes in Gluon (look.search_gluon), the memory read once per 256
    # queries (4 consumer warpgroups; 32-row tiles in 8 buffers, or 16-row tiles in 16), or
    # once per 128 (2 warpgroups, 64-row tiles in 4). 64 KB of tiles in flight per SM: at ~23
    # GB/s per SM (3 TB/s over 132) and ~1-2 µs of memory latency, 32 KB would barely keep the
    # copies streaming, and the ring also absorbs the consumers' drift. Not yet run on a GPU:
    # tune_kernel_config leaves them out unless asked (benchmarks/search_tune.py --configs 36
    # 37 38 times them).
    SearchKernelConfig(64, 32, 4, 8, "fused", "atomic", kernel="gluon"),
    SearchKernelConfig(64, 16, 4, 16, "fused", "atomic", kernel="gluon"),
    SearchKernelConfig(64, 64, 4, 4, "fused", "atomic", kernel="gluon", gluon_groups=2),
    # Session 14: the default with the Gluon bound pass's bins in the Triton bound pass (any
    # GPU): fewer instructions per tile (benchmarks/kernel_resources.py), between 1.1 % fewer
    # and 1.0 % more candidates (benchmarks/search_candidates.py --bins 39).
    SearchKernelConfig(64, 32, 4, 4, "fused", "atomic", bound_bins=True),
    # Session 23: config 36 with its collect pass's tiles in pairs (a barrier fewer per tile),
    # and with its buffers also freed a pair at a time (half a barrier fewer again).
    SearchKernelConfig(64, 32, 4, 8, "fused", "atomic", kernel="gluon", gluon_tile_pairs=True),
    SearchKernelConfig(
        64,
        32,
        4,
        8,
        "fused",
        "atomic",
        kernel="gluon",
        gluon_tile_pairs=True,
        gluon_pair_release=True,
    ),
)
# What tune_kernel_config tries by default: the Triton configs. (The Gluon ones first ran in
# session 20, on an H200; config 36 is the default on Hopper since session 22: HOPPER_CONFIG.)
TUNED_CONFIGS = tuple(config for config in KERNEL_CONFIGS if config.kernel == "triton")
# The default on a Hopper GPU with Gluon: config 36's warp-specialised passes. Since session
# 22's one verdict per warp in its collect pass, the H200 ran it faster than config 0 alone
# (2.61 against 3.92 ms at 14.2M rows, 0.81 against 0.91 at 1.28M) and in the step (1.056 and
# 1.012 x CE, docs/results.md). Elsewhere config 0 (the Triton passes).
HOPPER_CONFIG = KERNEL_CONFIGS[36]
_kernel_config: SearchKernelConfig | None = None  # None: by device (get_kernel_config)


def get_kernel_config(device: torch.device | None = None) -> SearchKernelConfig:
    """The configuration :func:`fused_knn_search` uses when none is passed: the one given to
    :func:`set_kernel_config`, else :data:`HOPPER_CONFIG` for a memory on a Hopper GPU whose
    Triton has Gluon, and ``KERNEL_CONFIGS[0]`` elsewhere (``device`` None: not a GPU)."""
    if _kernel_config is not None:
        return _kernel_config
    return _device_default_config(device)


def _device_default_config(device: torch.device | None) -> SearchKernelConfig:
    """:data:`HOPPER_CONFIG` on a Hopper GPU with Gluon, unless a Gluon pass has failed in this
    process (its work then goes to the Triton passes, which config 0's tiles suit better);
    ``KERNEL_CONFIGS[0]`` elsewhere."""
    if device is not None and not _GLUON_FALLBACK.failed and _hopper_with_gluon(device):
        return HOPPER_CONFIG
    return KERNEL_CONFIGS[0]


@lru_cache(maxsize=16)
def _hopper_with_gluon(device: torch.device) -> bool:
    try:  # a Triton whose Gluon differs must not break the search: the Triton passes run then
        from look.search_gluon import gluon_runs_on

        return gluon_runs_on(device)
    except Exception:
        return False


def set_kernel_config(config: SearchKernelConfig | None) -> None:
    """Make ``config`` the process-wide default (e.g. the result of :func:`tune_kernel_config`);
    None restores the choice by device (:func:`get_kernel_config`)."""
    global _kernel_config
    _kernel_config = config


SELECTIONS = ("fused", "sort", "topk")


def _largest(values: Tensor, k: int, select: str) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row, sorted descending, and their columns (PyTorch:
    ``"topk"``, or a segmented ``"sort"``, which can beat topk's radix select for short rows
    and also serves ``"fused"`` where its kernels do not apply)."""
    if select not in SELECTIONS:
        raise ValueError(f"select must be one of {SELECTIONS}, got {select!r}")
    if select == "topk":
        return values.topk(k, dim=1, largest=True, sorted=True)
    ordered, order = values.sort(dim=1, descending=True)
    return ordered[:, :k], order[:, :k]


# Largest row (power of two) the fused selections hold in registers: the bound's radix select
# and the candidates' sort (packed int64 keys; 4,096 for k = 200 with s = 4, 8,192 with s = 8,
# over 16 warps: 128 registers per thread on sm_90, no spills).
_FUSED_BOUND_COLUMNS = 16384
_FUSED_CANDIDATES = 8192
# The fused selections: after a failure (e.g. a compiler error on this GPU) the search selects
# with PyTorch's sort for the rest of the process.
_SELECT_FALLBACK = KernelFallback(
    "the fused search's selection kernels",
    "selecting with torch.sort instead (same results, more kernels per search)",
)


def _fused_select_applies(select: str, columns: int, limit: int) -> bool:
    """Whether the fused selection of rows of ``columns`` entries (at most ``limit``) runs."""
    block = _next_power_of_two(max(columns, 16))
    return select == "fused" and not _SELECT_FALLBACK.failed and block <= limit


def _selection_launch(columns: int, *, bound: bool) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` of a fused selection over rows of ``columns`` entries: the bound's
    radix select keeps up to 32 entries per thread, the candidates' sort 8 warps up to 4,096
    keys and 16 beyond (16 int64 keys per thread either way)."""
    block = _next_power_of_two(max(columns, 16))
    return block, (max(4, min(16, block // 512)) if bound else (8 if block <= 4096 else 16))


def _small_selection_block(block: int, k: int) -> int:
    """The candidates' sort of a query with at most this many candidates sorts this many slots
    instead of ``block``: a quarter of the buffer (which has room for ~4x the expected count:
    ~400 and ~800 candidates in 4,096 slots on the H100's benchmark banks), at least k."""
    return max(_next_power_of_two(max(k, 1)), block // 4)


def _kth_largest(values: Tensor, k: int, select: str) -> Tensor:
    """``(B,)``: the ``k``-th largest entry of each row of ``values`` (fp32)."""
    rows, columns = values.shape
    if values.stride(1) == 1 and _fused_select_applies(select, columns, _FUSED_BOUND_COLUMNS):
        block, warps = _selection_launch(columns, bound=True)
        out = torch.empty(rows, dtype=torch.float32, device=values.device)
        try:
            _kth_largest_kernel[(rows,)](
                values, out, columns, values.stride(0), k, BLOCK=block, num_warps=warps
            )
            return out
        except Exception as error:  # any kernel failure: warn once, select with PyTorch
            _SELECT_FALLBACK.fail(error)
    return _largest(values, k, select)[0][:, k - 1]


def _select_candidates(
    values: Tensor,
    indices: Tensor,
    counts: Tensor,
    query_ids: Tensor | None,
    k: int,
    select: str,
) -> tuple[Tensor, Tensor]:
    """The ``k`` largest of each query's candidates (the first ``counts`` slots of ``values`` /
    ``indices``, ``(B, capacity)``), without its own row with ``query_ids``, sorted
    descending: ``(B, k)`` values and memory rows, -inf / -1 where there are fewer."""
    batch, capacity = values.shape
    contiguous = values.is_contiguous() and indices.is_contiguous()
    if contiguous and k <= capacity and _fused_select_applies(select, capacity, _FUSED_CANDIDATES):
        block, warps = _selection_launch(capacity, bound=False)
        out_values = torch.empty(batch, k, dtype=torch.float32, device=values.device)
        out_indices = torch.empty(batch, k, dtype=torch.int64, device=values.device)
        ids = query_ids if query_ids is not None else counts  # (never read without ids)
        try:
            _select_candidates_kernel[(batch,)](
                values, indices, counts, ids, out_values, out_indices, capacity, k,
                HAS_IDS=query_ids is not None, BLOCK=block,
                SMALL_BLOCK=_small_selection_block(block, k), num_warps=warps,
            )  # fmt: skip
            return out_values, out_indices
        except Exception as error:  # any kernel failure: warn once, select with PyTorch
            _SELECT_FALLBACK.fail(error)
    # PyTorch: slots past a query's count are masked here (the kernel never reads them).
    neg_inf = float("-inf")
    unfilled = torch.arange(capacity, device=values.device) >= counts.unsqueeze(1)
    values = values.masked_fill(unfilled, neg_inf)
    if query_ids is not None:
        # Leave-one-out: the query's own row (at most one candidate) leaves the buffer, and the
        # k largest of the rest are the top k of the other rows (the bound holds for k + 1 of
        # all rows).
        values = values.masked_fill(indices == query_ids.unsqueeze(1), neg_inf)
    keep = min(k, capacity)
    top_values, order = _largest(values, keep, select)
    top_indices = indices.gather(1, order)
    if keep < k:
        top_values = torch.cat([top_values, top_values.new_full((batch, k - keep), neg_inf)], 1)
        top_indices = torch.cat([top_indices, top_indices.new_full((batch, k - keep), -1)], 1)
    return top_values, top_indices.masked_fill(top_values == neg_inf, -1)


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def _cdiv(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded up, on the host (``triton.cdiv`` also serves kernels
    and costs a few microseconds per host call)."""
    return -(-numerator // denominator)


@dataclass(frozen=True)
class _KernelPass:
    """One pass of the kernel with its argument values and grid. The launch and
    :func:`compile_kernel` build from the same values, so a static check compiles what the GPU
    runs: Triton specialises on them (16-divisible pointers, ints and strides give vector loads and
    a pipelined loop; an int equal to 1 becomes a constant)."""

    arguments: tuple[object, ...]
    constexprs: dict[str, object]
    config: SearchKernelConfig
    grid: tuple[int, int]

    def launch(self) -> None:
        _knn_tiles_kernel[self.grid](
            *self.arguments,
            **self.constexprs,
            num_warps=self.config.num_warps,
            num_stages=self.config.num_stages,
        )


@dataclass(frozen=True)
class _SearchPlan:
    """Grid, tile counts and buffer sizes of one search (shared by the search and
    compile_kernel)."""

    block_q: int
    query_blocks: int
    total_tiles: int
    tile_stride: int  # s: the bound pass reads every s-th tile
    sampled_tiles: int
    has_bound: bool  # enough sampled tiles for a bound; else the collect pass keeps everything
    bound_programs: int  # programs per query block of the bound pass
    bound_keep: int  # tile maxima each bound-pass program keeps per query
    collect_programs: int
    capacity: int  # candidate buffer per query

    @property
    def bound_columns(self) -> int:
        """Columns of the bound pass's output: every program's kept tile maxima."""
        return self.bound_programs * self.bound_keep


def _programs_per_query_block(
    num_tiles: int, query_blocks: int, multiprocessors: int | None
) -> int:
    """Enough programs to fill the GPU (8 per SM over all query blocks), each looping over
    tiles; under the interpreter (``multiprocessors`` None) a few programs."""
    if multiprocessors is None:
        return max(1, min(num_tiles, 4))
    return max(1, min(num_tiles, 8 * multiprocessors // query_blocks))


@lru_cache(maxsize=64)  # a training run searches with a few shapes, every step
def _search_plan(
    batch: int,
    rows: int,
    search_k: int,
    config: SearchKernelConfig,
    *,
    multiprocessors: int | None,
    max_tile_stride: int | None = None,
    capacity: int | None = None,
    prefilter: bool = False,
) -> _SearchPlan:
    block_q = max(16, min(config.block_q, _next_power_of_two(batch)))
    query_blocks = _cdiv(batch, block_q)
    total_tiles = _cdiv(rows, config.block_n)
    # s keeps >= 4k sampled tiles so the bound is tight.
    if max_tile_stride is None:
        max_tile_stride = config.tile_stride
    tile_stride = max(1, min(max_tile_stride, total_tiles // (4 * search_k)))
    sampled_tiles = _cdiv(total_tiles, tile_stride)
    has_bound = sampled_tiles >= search_k
    bound_programs = _programs_per_query_block(sampled_tiles, query_blocks, multiprocessors)
    # Each program keeps its largest tile maxima: 4× k in all, so that the k largest of the
    # whole pass are almost always among them (if not, the bound is a little looser, never
    # wrong), but at most what the program sees. The selection then sorts ~4k values per query
    # instead of every sampled tile's (111k at 14M rows, s = 4).
    tiles_per_program = _cdiv(sampled_tiles, bound_programs)
    if config.bound_bins:  # one bin per position of the tile
        bound_keep = config.block_n
    else:
        bound_keep = _next_power_of_two(
            max(4, min(tiles_per_program, _cdiv(4 * search_k, bound_programs)))
        )
    collect_programs = _programs_per_query_block(total_tiles, query_blocks, multiprocessors)
    if capacity is None:
        # ~s·k candidates pass a bound from every s-th tile: room for 4× that.
        capacity = max(1024, 16 * search_k, 4 * tile_stride * search_k) if has_bound else rows
        if prefilter and has_bound:
            # The int8 pre-filter's collect test is looser by its error bound (1.3-1.4x the
            # candidates on random unit rows, 1.9x with its own bound pass): twice the room,
            # up to what the candidates' fused sort holds (8,192 slots: ~2x the largest count
            # seen with s = 8, benchmarks/search_candidates.py --int8).
            capacity = min(2 * capacity, max(capacity, _FUSED_CANDIDATES))
    return _SearchPlan(
        block_q, query_blocks, total_tiles, tile_stride, sampled_tiles, has_bound,
        bound_programs, bound_keep, collect_programs, capacity,
    )  # fmt: skip


def _kernel_pass(
    query: Tensor,
    memory: Tensor,
    valid: Tensor | None,
    plan: _SearchPlan,
    config: SearchKernelConfig,
    *,
    tile_max: Tensor | None = None,
    bound: Tensor | None = None,
    out_values: Tensor | None = None,
    out_indices: Tensor | None = None,
    counts: Tensor | None = None,
    prefilter: tuple[QuantizedRows, Tensor, Tensor] | None = None,
) -> _KernelPass:
    """The bound pass (``tile_max`` given: every s-th tile, each program's largest tile maxima
    into ``tile_max``) or the collect pass (``bound`` and the buffers given: every tile). With
    ``prefilter`` (the int8 rows, the queries' int8 residual parts and their terms; ``query``
    then holds the int8 high parts) the pass reads the int8 rows instead of ``memory``."""
    collect = bound is not None
    if prefilter is not None:
        memory = prefilter[0].values
    batch, dim = query.shape
    dummy = query  # never read: the constexpr flags switch the loads off
    block_d = max(16, _next_power_of_two(dim))
    if config.loads not in ("pointer", "tma"):
        raise ValueError(f"loads must be 'pointer' or 'tma', got {config.loads!r}")
    # A descriptor needs 16-byte aligned rows (e.g. not 20-d fp16 rows): pointer loads there.
    tma_loads = (
        config.loads == "tma"
        and memory.stride(0) * memory.element_size() % 16 == 0
        and memory.data_ptr() % 16 == 0
    )
    memory_argument: object = memory
    if tma_loads:
        from triton.tools.tensor_descriptor import TensorDescriptor

        memory_argument = TensorDescriptor.from_tensor(memory, [config.block_n, block_d])
    arguments = (
        query,
        memory_argument,
        valid if valid is not None else dummy,
        bound if bound is not None else dummy,
        tile_max if tile_max is not None else dummy,
        out_values if out_values is not None else dummy,
        out_indices if out_indices is not None else dummy,
        counts if counts is not None else dummy,
        prefilter[1] if prefilter is not None else dummy,
        prefilter[2] if prefilter is not None else dummy,
        prefilter[0].scales if prefilter is not None else dummy,
        prefilter[0].errors if prefilter is not None else dummy,
        batch,
        memory.shape[0],
        dim,
        query.stride(0),
        memory.stride(0),
        bound.stride(0) if bound is not None else 1,  # (a column of the sorted tile maxima)
        plan.total_tiles if collect else plan.sampled_tiles,
        1 if collect else plan.tile_stride,
        plan.capacity if collect else 0,
        0 if collect else plan.bound_columns,
    )
    # With at least a tile of rows, a partial last tile is shifted back to end at the last row
    # and the loop loads without row-end masks. (Bulk copies need no masks: they pad with
    # zeros past the end, and a shift there made the 128 × 64 tile spill.)
    shift_last_tile = memory.shape[0] >= config.block_n and not tma_loads
    constexprs: dict[str, object] = {
        "HAS_VALID": valid is not None,
        "COLLECT": collect,
        "WIDEN_BOUND": collect and plan.has_bound,
        "ATOMIC_PER_CANDIDATE": config.collect == "atomic",
        "SKIP_EMPTY_TILES": config.skip_empty_tiles,
        "BLOCK_Q": plan.block_q,
        "BLOCK_N": config.block_n,
        "BLOCK_D": block_d,
        "BOUND_KEEP": 1 if collect else plan.bound_keep,
        "TMA_LOADS": tma_loads,
        "EVEN_D": dim == block_d,
        "SHIFT_LAST_TILE": shift_last_tile,
        # A shifted last tile repeats rows of the tile before it. The bound pass must not count
        # them twice only if it reads every tile (s = 1); with s >= 2 the repeated rows belong
        # to a tile it skips. The collect pass checks them on its append path only.
        "EXCLUDE_REPEATS": shift_last_tile and (collect or plan.tile_stride == 1),
        # fp32 queries: rounded to the memory's dtype in the kernel, int16 parts of the int8
        # pre-filter's queries narrowed to int8 (query_operand "registers")
        "QUERY_DTYPE": (
            (tl.bfloat16 if memory.dtype == torch.bfloat16 else tl.float16)
            if query.dtype == torch.float32
            else (tl.int8 if query.dtype == torch.int16 else None)
        ),
        "INT8_ROWS": prefilter is not None,
        "BOUND_BINS": config.bound_bins and not collect,
    }
    programs = plan.collect_programs if collect else plan.bound_programs
    return _KernelPass(arguments, constexprs, config, (plan.query_blocks, programs))


@torch.no_grad()
def fused_knn_search(
    query: Tensor,
    memory: Tensor,
    k: int,
    *,
    query_ids: Tensor | None = None,
    memory_valid: Tensor | None = None,
    max_tile_stride: int | None = None,
    capacity: int | None = None,
    config: SearchKernelConfig | None = None,
    timings: dict[str, float] | None = None,
    prefilter: QuantizedRows | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact top-``k`` rows of a bf16/fp16 ``memory`` by inner product (see the module doc).

    Inputs are assumed validated by :func:`look.search.knn_search`. Returns ``values`` (fp32) and
    ``indices`` (int64), both ``(B, k)`` sorted descending with ``-inf``/``-1`` padding, and a
    ``(B,)`` bool tensor marking the queries whose candidate buffer overflowed: their rows are
    wrong and must be recomputed by the caller. ``timings``, if given, receives the seconds of
    each phase (synchronising the GPU between phases: for benchmarks only). ``prefilter``, an
    int8 copy of ``memory`` (:class:`QuantizedRows`), makes both passes read it instead, and the
    candidates are then re-scored from ``memory``: same neighbours, about half the bytes read.
    With :func:`set_graph_replay` on, a search on a GPU is recorded once per shape and set of
    buffers as a CUDA graph and replayed after that (the same results, one host call for all of
    its kernels; see :func:`set_graph_replay`).
    """
    search = partial(
        _fused_knn_search, k=k, memory_valid=memory_valid, max_tile_stride=max_tile_stride,
        capacity=capacity, config=config or get_kernel_config(memory.device), prefilter=prefilter,
    )  # fmt: skip
    if timings is None and query.shape[0] > 0 and _replays_graphs(memory.device):
        return _replayed_search(search, query, memory, query_ids)
    return search(query, memory, query_ids=query_ids, timings=timings)


def _fused_knn_search(
    query: Tensor,
    memory: Tensor,
    k: int,
    *,
    query_ids: Tensor | None,
    memory_valid: Tensor | None,
    max_tile_stride: int | None,
    capacity: int | None,
    config: SearchKernelConfig,
    timings: dict[str, float] | None = None,
    prefilter: QuantizedRows | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`fused_knn_search`, its kernels launched one by one."""
    if not fused_search_supported(query, memory, memory_ids=None):
        raise ValueError("fused_knn_search needs Triton and a CUDA bf16/fp16 memory")
    batch = query.shape[0]
    device = memory.device
    if batch == 0:  # a grid of zero programs is not launchable
        return (
            torch.empty(0, k, dtype=torch.float32, device=device),
            torch.empty(0, k, dtype=torch.int64, device=device),
            torch.empty(0, dtype=torch.bool, device=device),
        )
    if config.query_operand not in ("shared", "registers"):
        raise ValueError(
            f"query_operand must be 'shared' or 'registers', got {config.query_operand!r}"
        )
    if prefilter is not None and not prefilter.matches(memory):
        raise ValueError(
            f"the int8 pre-filter has shape {tuple(prefilter.values.shape)} on "
            f"{prefilter.values.device}, the memory {tuple(memory.shape)} on {memory.device}: "
            "it must be a copy of this memory (QuantizedRows.from_memory)"
        )
    # (with "registers" the kernel rounds fp32 queries itself: no conversion kernel here)
    query_dtype = memory.dtype if config.query_operand == "shared" else torch.float32
    queries = query.detach().to(query_dtype).contiguous()
    bound_queries, int8_pass, bound_int8_pass = queries, None, None
    if prefilter is not None:  # int8 parts of the queries as the memory's dtype rounds them
        rounded = (
            queries if queries.dtype == memory.dtype else query.detach().to(memory.dtype).contiguous()
        )
        queries, query_low, query_terms = _quantize_queries(rounded, prefilter)
        if config.query_operand == "registers":  # widened: the kernel narrows them again
            queries, query_low = queries.to(torch.int16), query_low.to(torch.int16)
        int8_pass = (prefilter, query_low, query_terms)
        if config.int8_bound_pass:
            bound_queries, bound_int8_pass = queries, int8_pass
    memory = memory.detach()
    if memory.stride(1) != 1:
        memory = memory.contiguous()
    # Read as bytes through a view: a uint8 copy would cost a pass over N bytes every step (and
    # Triton's bool pointers have had their own load and store rules).
    valid = (
        memory_valid.to(device=device, dtype=torch.bool).contiguous().view(torch.uint8)
        if memory_valid is not None
        else None
    )
    if config.collect not in ("scan", "atomic"):
        raise ValueError(f"collect must be 'scan' or 'atomic', got {config.collect!r}")
    if config.kernel not in ("triton", "gluon"):
        raise ValueError(f"kernel must be 'triton' or 'gluon', got {config.kernel!r}")
    clock = _PhaseClock(device, timings)
    # Leave-one-out costs no work per similarity: bound one neighbour more over every row, then
    # mask each query's own row out of its candidates.
    search_k = k + 1 if query_ids is not None else k
    multiprocessors = _multiprocessor_count(device)
    plan = _search_plan(
        batch, memory.shape[0], search_k, config, multiprocessors=multiprocessors,
        max_tile_stride=max_tile_stride, capacity=capacity, prefilter=prefilter is not None,
    )  # fmt: skip
    capacity = plan.capacity

    gluon = _gluon_applies(config, queries, memory, prefilter, multiprocessors)
    # Pass 1: tile maxima over every s-th tile (Gluon's: bins of rows over them).
    if plan.has_bound:
        tile_max = None
        if gluon:
            columns = _gluon_bound_columns(batch, plan, config, multiprocessors)
            tile_max = torch.empty(batch, columns, dtype=torch.float32, device=device)
            if not _launch_gluon(lambda: _gluon_bound_pass(
                queries, memory, valid, tile_max, plan, config, multiprocessors
            )):  # fmt: skip
                gluon, tile_max = False, None
        if tile_max is None:
            tile_max = torch.empty(batch, plan.bound_columns, dtype=torch.float32, device=device)
            _kernel_pass(
                bound_queries, memory, valid, plan, config, tile_max=tile_max,
                prefilter=bound_int8_pass,
            ).launch()  # fmt: skip
        clock.lap("bound_pass")
        # (the collect pass widens it by a margin: WIDEN_BOUND in the kernel)
        bound = _kth_largest(tile_max, search_k, config.select)
        clock.lap("bound_topk")
    else:  # too few tiles for a bound: collect every candidate (small memories)
        bound = torch.full((batch,), torch.finfo(torch.float32).min, device=device)

    # Pass 2: collect every similarity >= bound into a per-query buffer (only the first
    # counts[q] slots of a query's row are written, and only those are read).
    out_values = torch.empty(batch, capacity, dtype=torch.float32, device=device)
    out_indices = torch.empty(batch, capacity, dtype=torch.int64, device=device)
    counts = torch.zeros(batch, dtype=torch.int32, device=device)
    if not gluon or not _launch_gluon(lambda: _gluon_collect_pass(
        queries, memory, valid, bound, out_values, out_indices, counts, plan, config,
        multiprocessors,
    )):  # fmt: skip
        counts.zero_()  # (a failed Gluon launch wrote nothing; the Triton pass starts afresh)
        _kernel_pass(
            queries, memory, valid, plan, config,
            bound=bound, out_values=out_values, out_indices=out_indices, counts=counts,
            prefilter=int8_pass,
        ).launch()  # fmt: skip

    clock.lap("collect_pass")
    if prefilter is not None:
        _rescore_candidates(out_values, out_indices, counts, rounded, memory)
        clock.lap("rescore")
    ids = None if query_ids is None else query_ids.to(device=device, dtype=torch.int64)
    values, indices = _select_candidates(out_values, out_indices, counts, ids, k, config.select)
    clock.lap("select_topk")
    if timings is not None:
        timings["mean_candidates"] = float(counts.float().mean())
        timings["hit_tile_frac"] = _hit_tile_fraction(out_indices, counts, plan, config.block_n)
    return values, indices, counts > capacity


def _multiprocessor_count(device: torch.device) -> int | None:
    """The GPU's streaming multiprocessors (the passes' grids fill them); None on CPU, where
    Triton's interpreter runs the Triton passes and no Gluon pass runs."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclass(frozen=True)
class _RecordedSearch:
    """A recorded search: its input buffers, the replay, and the outputs each replay writes."""

    query: Tensor
    query_ids: Tensor | None
    replay: Callable[[], None]
    outputs: tuple[Tensor, Tensor, Tensor]


_graph_replay = False
_GRAPH_FALLBACK = KernelFallback(
    "recording the fused search as a CUDA graph",
    "its kernels are launched one by one for the rest of this process",
)
# Recorded searches by key (_recording_key), the most recently used last; at most this many
# are kept (each holds its own buffers: ~13 MB for 256 queries with 4,096-slot buffers).
_RECORDINGS: OrderedDict[tuple[object, ...], _RecordedSearch] = OrderedDict()
_MAX_RECORDINGS = 8


def set_graph_replay(enabled: bool) -> None:
    """Whether :func:`fused_knn_search` on a GPU records a search as a CUDA graph the first
    time it meets its shapes and buffers, and replays the recording from then on.

    Why: a search is ~6 kernels and a dozen PyTorch operations, and the host spends a few
    hundred microseconds queuing them; a GPU that finishes a pass before the host has queued the
    next one waits (at 1.28M rows the H100 ran the passes in ~0.6 ms of a ~1.0 ms search alone,
    session 12). A replay is one host call. The results are the same: the recording reads the
    memory's current rows, and a replay's queries and ids are copied into the recording's own
    input buffers and its outputs are copied out (a result is never overwritten by a later
    search). A recording is keyed by the memory, valid mask and int8 copy (their addresses,
    shapes and dtypes), the query shape and dtype, k, the config and the CUDA stream; at most
    8 are kept. The first search of a key runs eagerly (it compiles the kernels), then is
    recorded. If recording fails, a warning says so once and searches run eagerly. Off by
    default: the replay has not been timed on a GPU yet. Turning it off drops the recordings."""
    global _graph_replay
    _graph_replay = bool(enabled)
    if not _graph_replay:
        _RECORDINGS.clear()


def graph_replay_enabled() -> bool:
    """Whether :func:`set_graph_replay` is on."""
    return _graph_replay


_GRAPH_DEVICE_TYPES = ("cuda",)  # (a CPU test adds "cpu" with a stand-in recorder)


def _replays_graphs(device: torch.device) -> bool:
    """Whether searches on ``device`` are recorded and replayed (CUDA only)."""
    return _graph_replay and device.type in _GRAPH_DEVICE_TYPES and not _GRAPH_FALLBACK.failed


def _tensor_key(tensor: Tensor | None) -> tuple[object, ...] | None:
    """What a recording depends on of a buffer it reads: where it is and how it is laid out."""
    if tensor is None:
        return None
    return (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())


def _recording_key(
    search: partial[tuple[Tensor, Tensor, Tensor]], query: Tensor, memory: Tensor,
    query_ids: Tensor | None,
) -> tuple[object, ...]:  # fmt: skip
    options = search.keywords
    prefilter: QuantizedRows | None = options["prefilter"]
    prefilter_key = None
    if prefilter is not None:
        prefilter_key = tuple(
            _tensor_key(part)
            for part in (prefilter.values, prefilter.scales, prefilter.errors,
                         prefilter.norm_bound, prefilter.error_bound)
        )  # fmt: skip
    return (
        memory.device,
        torch.cuda.current_stream(memory.device).cuda_stream if memory.is_cuda else None,
        _tensor_key(memory),
        _tensor_key(options["memory_valid"]), prefilter_key, tuple(query.shape), query.dtype,
        query.device, None if query_ids is None else tuple(query_ids.shape), options["k"],
        options["max_tile_stride"], options["capacity"], options["config"],
        # a kernel that failed since is not in a newer recording
        _SELECT_FALLBACK.failed, _GLUON_FALLBACK.failed,
    )  # fmt: skip


def _record_cuda_graph(
    run: Callable[[], tuple[Tensor, Tensor, Tensor]], device: torch.device
) -> tuple[Callable[[], None], tuple[Tensor, Tensor, Tensor]]:
    """Record ``run`` (already run once eagerly with the same arguments: its kernels are
    compiled and loaded) as a CUDA graph on a side stream: its replay, and the outputs each
    replay overwrites (held in the graph's own memory pool)."""
    graph = torch.cuda.CUDAGraph()
    # "thread_local": only this thread's CUDA calls are checked while recording; a training
    # run's other threads (a DataLoader's pinned-memory copies) go on as they would.
    with torch.cuda.graph(
        graph, stream=torch.cuda.Stream(device), capture_error_mode="thread_local"
    ):
        outputs = run()
    return graph.replay, outputs


def _replayed_search(
    search: partial[tuple[Tensor, Tensor, Tensor]], query: Tensor, memory: Tensor,
    query_ids: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The search of ``query`` by its recording: replayed if there is one, else run eagerly and
    then recorded (see :func:`set_graph_replay`)."""
    key = _recording_key(search, query, memory, query_ids)
    recorded = _RECORDINGS.get(key)
    if recorded is None:
        # The recording's own input buffers, searched eagerly first: that compiles and loads
        # every kernel the recording launches (bad input raises here), and is this result.
        inputs = query.detach().clone(memory_format=torch.contiguous_format)
        ids = (
            None
            if query_ids is None
            else query_ids.to(device=memory.device, dtype=torch.int64, copy=True)
        )
        run = partial(search, inputs, memory, query_ids=ids)
        result = run()
        try:
            replay, outputs = _record_cuda_graph(run, memory.device)
        except Exception as error:  # any recording failure: eager searches from now on
            _GRAPH_FALLBACK.fail(error, stacklevel=4)
            _RECORDINGS.clear()
            return result
        _RECORDINGS[key] = _RecordedSearch(inputs, ids, replay, outputs)
        while len(_RECORDINGS) > _MAX_RECORDINGS:
            _RECORDINGS.popitem(last=False)
        return result
    _RECORDINGS.move_to_end(key)
    recorded.query.copy_(query)
    if recorded.query_ids is not None and query_ids is not None:
        recorded.query_ids.copy_(query_ids)
    recorded.replay()
    values, indices, overflowed = recorded.outputs
    return values.clone(), indices.clone(), overflowed.clone()


_GLUON_FALLBACK = KernelFallback(
    "the Gluon passes of the fused search",
    "the Triton passes run instead for the rest of this process",
)


def _gluon_applies(
    config: SearchKernelConfig,
    queries: Tensor,
    memory: Tensor,
    prefilter: QuantizedRows | None,
    multiprocessors: int | None,
) -> bool:
    """Whether the Gluon passes run: ``config`` asks for them and they apply (a Hopper GPU, no
    int8 pre-filter: :func:`look.search_gluon.gluon_applies`; never on CPU, where Triton's
    interpreter cannot run Gluon); else the Triton passes run."""
    if config.kernel != "gluon" or prefilter is not None or _GLUON_FALLBACK.failed:
        return False
    if multiprocessors is None:
        return False
    from look import search_gluon

    return search_gluon.gluon_applies(queries, memory)


# The Gluon passes of a search, built from its plan and config in one place for the search and
# compile_kernel (as _kernel_pass builds the Triton passes); look.search_gluon is imported
# only where they run.


def _gluon_bound_columns(
    batch: int, plan: _SearchPlan, config: SearchKernelConfig, multiprocessors: int
) -> int:
    from look import search_gluon

    return search_gluon.gluon_bound_columns(
        batch, plan.sampled_tiles, block_n=config.block_n, groups=config.gluon_groups,
        multiprocessors=multiprocessors,
    )  # fmt: skip


def _gluon_bound_pass(
    queries: Tensor, memory: Tensor, valid: Tensor | None, tile_max: Tensor, plan: _SearchPlan,
    config: SearchKernelConfig, multiprocessors: int,
) -> object:  # fmt: skip
    from look import search_gluon

    return search_gluon.gluon_bound_pass(
        queries, memory, valid, tile_max, sampled_tiles=plan.sampled_tiles,
        tile_step=plan.tile_stride, block_n=config.block_n, stages=config.num_stages,
        groups=config.gluon_groups, multiprocessors=multiprocessors,
    )  # fmt: skip


def _gluon_collect_pass(
    queries: Tensor, memory: Tensor, valid: Tensor | None, bound: Tensor, out_values: Tensor,
    out_indices: Tensor, counts: Tensor, plan: _SearchPlan, config: SearchKernelConfig,
    multiprocessors: int,
) -> object:  # fmt: skip
    from look import search_gluon

    return search_gluon.gluon_collect_pass(
        queries, memory, valid, bound, out_values, out_indices, counts,
        block_n=config.block_n, stages=config.num_stages, groups=config.gluon_groups,
        widen_bound=plan.has_bound, multiprocessors=multiprocessors,
        tile_pairs=config.gluon_tile_pairs, pair_release=config.gluon_pair_release,
    )  # fmt: skip


def _launch_gluon(build: Callable[[], object]) -> bool:
    """Build and launch a Gluon pass; False (after one warning, and from then on) if that
    fails: the Triton pass then does its work (a failed build or launch writes nothing)."""
    try:
        build().launch()  # type: ignore[attr-defined]
    except Exception as error:  # any compile or launch failure
        _GLUON_FALLBACK.fail(error, stacklevel=3)
        return False
    return True


def _hit_tile_fraction(
    candidates: Tensor, counts: Tensor, plan: _SearchPlan, block_n: int
) -> float:
    """Of all (query block, tile) pairs of the collect pass, the fraction whose tile kept a
    candidate for some query of the block (the first ``counts`` rows of ``candidates``): the
    tiles that took the append path (for benchmarks; a tile whose only passing rows were
    excluded also took it, and is not counted)."""
    batch, capacity = candidates.shape
    block_of = torch.arange(batch, device=candidates.device) // plan.block_q
    filled = torch.arange(capacity, device=candidates.device) < counts.unsqueeze(1)
    keys = block_of.unsqueeze(1) * plan.total_tiles + candidates // block_n
    hit = torch.unique(keys[filled]).numel()
    return hit / (plan.query_blocks * plan.total_tiles)


class _PhaseClock:
    """Wall time of each phase into ``timings`` (synchronising the device); a no-op without it."""

    def __init__(self, device: torch.device, timings: dict[str, float] | None) -> None:
        self.device, self.timings = device, timings
        self.start = self._now() if timings is not None else 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str) -> None:
        if self.timings is None:
            return
        now = self._now()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.start
        self.start = now


def compile_kernel(
    config: SearchKernelConfig,
    *,
    collect: bool,
    capability: int,
    dtype: str = "bf16",
    dim: int = 128,
    has_valid: bool = True,
    batch: int = 256,
    rows: int = 1_281_167,
    k: int = 200,
    multiprocessors: int = 132,
    prefilter: bool = False,
) -> object:
    """Compile one pass of the search kernel (the bound pass, or the collect pass with
    ``collect``) for CUDA compute capability ``capability`` (e.g. 90 for Hopper), without a GPU:
    Triton lowers it to PTX and its bundled ``ptxas`` assembles it. Returns Triton's compiled
    kernel (``.asm["cubin"]``, ``.asm["ptx"]``, ``.metadata.shared``); raises if the compiler
    rejects the kernel. For CI checks and static resource reports
    (``benchmarks/kernel_resources.py``).

    The kernel is the one a leave-one-out search of ``batch`` queries for ``k`` neighbours over
    ``rows`` rows of ``dim`` dims launches on a GPU with ``multiprocessors`` SMs (an H100 SXM has
    132): the arguments are built as for the launch (on the meta device) and specialised by
    Triton's own launcher rule. That matters: without the launcher's
    16-divisibility facts the compiler emits scalar loads and no software pipeline. A config
    whose passes are Gluon's (``kernel="gluon"``) compiles those kernels for Hopper
    (elsewhere, and with ``prefilter``, the search runs the Triton passes, compiled here). With
    ``prefilter`` the collect pass reads an int8 copy (:class:`QuantizedRows`) of the memory,
    and the bound pass too with ``config.int8_bound_pass``.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    meta = torch.device("meta")
    query_dtype = torch_dtype if config.query_operand == "shared" else torch.float32
    queries = torch.empty(batch, dim, dtype=query_dtype, device=meta)
    memory = torch.empty(rows, dim, dtype=torch_dtype, device=meta)
    valid = torch.empty(rows, dtype=torch.uint8, device=meta) if has_valid else None
    plan = _search_plan(
        batch, rows, k + 1, config, multiprocessors=multiprocessors, prefilter=prefilter
    )
    int8_pass = None
    # (the bound pass reads the int8 copy only with config.int8_bound_pass, as in the search)
    if prefilter and (collect or config.int8_bound_pass):
        query_parts = torch.int8 if config.query_operand == "shared" else torch.int16
        queries = torch.empty(batch, dim, dtype=query_parts, device=meta)
        copy = QuantizedRows(
            torch.empty(rows, dim, dtype=torch.int8, device=meta),
            torch.empty(rows, device=meta),
            torch.empty(rows, device=meta),
            torch.empty((), device=meta),
            torch.empty((), device=meta),
        )
        int8_pass = (copy, torch.empty_like(queries), torch.empty(4, batch, device=meta))
    # The Gluon passes where the search runs them: Hopper, no int8 copy.
    # (with an int8 copy both passes are Triton's, the bound pass too: _gluon_applies)
    gluon = config.kernel == "gluon" and not prefilter and capability // 10 == 9
    bound_columns = plan.bound_columns
    if gluon:
        bound_columns = _gluon_bound_columns(batch, plan, config, multiprocessors)
    if collect:
        # The bound is the fused selection's output or a column of PyTorch's, as in
        # fused_knn_search (its stride is an argument that Triton specialises on).
        bound = torch.empty(batch, device=meta)
        if plan.has_bound and not _fused_select_applies(
            config.select, bound_columns, _FUSED_BOUND_COLUMNS
        ):
            tile_maxima = torch.empty(batch, bound_columns, device=meta)
            bound = _largest(tile_maxima, k + 1, config.select)[0][:, k]
        if gluon:
            return _gluon_collect_pass(
                queries, memory, valid, bound,
                torch.empty(batch, plan.capacity, device=meta),
                torch.empty(batch, plan.capacity, dtype=torch.int64, device=meta),
                torch.empty(batch, dtype=torch.int32, device=meta), plan, config,
                multiprocessors,
            ).compile(capability)  # type: ignore[attr-defined]
        kernel_pass = _kernel_pass(
            queries, memory, valid, plan, config,
            bound=bound,
            out_values=torch.empty(batch, plan.capacity, device=meta),
            out_indices=torch.empty(batch, plan.capacity, dtype=torch.int64, device=meta),
            counts=torch.empty(batch, dtype=torch.int32, device=meta),
            prefilter=int8_pass,
        )  # fmt: skip
    elif gluon:
        return _gluon_bound_pass(
            queries, memory, valid, torch.empty(batch, bound_columns, device=meta), plan, config,
            multiprocessors,
        ).compile(capability)  # type: ignore[attr-defined]
    else:
        tile_max = torch.empty(batch, plan.bound_columns, device=meta)
        kernel_pass = _kernel_pass(
            queries, memory, valid, plan, config, tile_max=tile_max, prefilter=int8_pass
        )
    return compile_for_capability(
        _knn_tiles_kernel, kernel_pass.arguments, kernel_pass.constexprs, capability,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


def compile_selection_kernels(
    capability: int,
    *,
    batch: int = 256,
    rows: int = 1_281_167,
    k: int = 200,
    config: SearchKernelConfig | None = None,
) -> tuple[object, object]:
    """Compile the fused selections (the bound's radix select and the leave-one-out candidate
    sort) for CUDA compute capability ``capability`` without a GPU, with the arguments a search
    of ``batch`` queries for ``k`` neighbours over ``rows`` rows passes under ``config`` (the
    default config if None) on a 132-SM GPU (for CI and ``benchmarks/kernel_resources.py``)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    meta = torch.device("meta")
    plan = _search_plan(batch, rows, k + 1, config or KERNEL_CONFIGS[0], multiprocessors=132)
    columns, capacity = plan.bound_columns, plan.capacity
    block, warps = _selection_launch(columns, bound=True)
    bound = compile_for_capability(
        _kth_largest_kernel,
        (torch.empty(batch, columns, device=meta), torch.empty(batch, device=meta), columns,
         columns, k + 1),
        {"BLOCK": block}, capability, num_warps=warps, num_stages=1,
    )  # fmt: skip
    block, warps = _selection_launch(capacity, bound=False)
    candidates = compile_for_capability(
        _select_candidates_kernel,
        (torch.empty(batch, capacity, device=meta),
         torch.empty(batch, capacity, dtype=torch.int64, device=meta),
         torch.empty(batch, dtype=torch.int32, device=meta),
         torch.empty(batch, dtype=torch.int64, device=meta), torch.empty(batch, k, device=meta),
         torch.empty(batch, k, dtype=torch.int64, device=meta), capacity, k),
        {"HAS_IDS": True, "BLOCK": block, "SMALL_BLOCK": _small_selection_block(block, k)},
        capability, num_warps=warps, num_stages=1,
    )  # fmt: skip
    return bound, candidates


def compile_prefilter_kernels(
    capability: int, *, batch: int = 256, rows: int = 14_197_122, dim: int = 128, k: int = 200
) -> tuple[object, object]:
    """Compile the int8 pre-filter's two helper kernels for CUDA compute capability
    ``capability`` without a GPU: the candidates' re-scoring, as a search of ``batch`` queries
    for ``k`` neighbours over ``rows`` bf16 rows of ``dim`` dims launches it (the default plan's
    buffer), and the copy's write of a batch of ``batch`` rows."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    meta = torch.device("meta")
    plan = _search_plan(batch, rows, k + 1, KERNEL_CONFIGS[0], multiprocessors=132,
                        prefilter=True)  # fmt: skip
    capacity, block_d = plan.capacity, max(16, _next_power_of_two(dim))
    rescore = compile_for_capability(
        _rescore_candidates_kernel,
        (torch.empty(batch, capacity, device=meta),
         torch.empty(batch, capacity, dtype=torch.int64, device=meta),
         torch.empty(batch, dtype=torch.int32, device=meta),
         torch.empty(batch, dim, dtype=torch.bfloat16, device=meta),
         torch.empty(rows, dim, dtype=torch.bfloat16, device=meta), capacity, dim, dim, dim),
        {"BLOCK_C": _RESCORE_BLOCK, "BLOCK_D": block_d}, capability, num_warps=4, num_stages=1,
    )  # fmt: skip
    write = compile_for_capability(
        _write_quantized_rows_kernel,
        (torch.empty(batch, dim, dtype=torch.bfloat16, device=meta),
         torch.empty(batch, dtype=torch.int64, device=meta),
         torch.empty(rows, dim, dtype=torch.int8, device=meta), torch.empty(rows, device=meta),
         torch.empty(rows, device=meta), torch.empty((), device=meta),
         torch.empty((), device=meta), dim, dim, dim),
        {"ERROR_MARGIN": _ERROR_MARGIN, "BLOCK_D": block_d}, capability, num_warps=4,
        num_stages=1,
    )  # fmt: skip
    return rescore, write


def compile_for_capability(
    kernel: object,
    arguments: tuple[object, ...],
    constexprs: dict[str, object],
    capability: int,
    *,
    num_warps: int,
    num_stages: int,
    maxnreg: int | None = None,
) -> object:
    """Compile the ``@triton.jit`` (or ``@gluon.jit``) ``kernel`` for CUDA compute capability
    ``capability`` without a GPU, specialised on ``arguments`` (meta-device tensors, tensor
    descriptors and ints, in the kernel's order) by the rule Triton's launcher applies, with
    ``constexprs`` given by name and ``maxnreg`` registers per thread at most."""
    from triton._C.libtriton import native_specialize_impl  # the rule JIT launches apply
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    names = list(kernel.arg_names)  # type: ignore[attr-defined]
    signature: dict[str, str] = {}
    resolved: dict[str, object] = dict(constexprs)
    attrs: dict[tuple[int, ...], list[list[object]]] = {}
    for position, value in enumerate(arguments):
        kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
        if kind == "constexpr":  # e.g. an int equal to 1
            resolved[names[position]] = key
        elif key == "D":
            attrs[(position,)] = BaseBackend.parse_attr(key)
        signature[names[position]] = kind
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    source_type = ASTSource
    if getattr(kernel, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource

        source_type = GluonASTSource
    source = source_type(kernel, signature, resolved, attrs)
    options: dict[str, object] = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def _nvidia_tool(name: str) -> str:
    """The path of a CUDA binary tool that ships with Triton (``ptxas``, ``cuobjdump``)."""
    from pathlib import Path

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def cuobjdump(cubin: bytes, *options: str) -> str:
    """What Triton's bundled ``cuobjdump`` prints for a compiled kernel's ``cubin`` with
    ``options`` (e.g. ``--dump-resource-usage``, ``-sass``)."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run(
            [_nvidia_tool("cuobjdump"), *options, file.name],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip


def cubin_resources(cubin: bytes) -> dict[str, int]:
    """Registers per thread (``reg``), stack/spill (``stack``, ``local``) and static shared
    (``shared``) bytes of a compiled kernel, read by the ``cuobjdump`` that ships with Triton."""
    import re

    report = cuobjdump(cubin, "--dump-resource-usage")
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", report))
    return {name.lower(): int(value) for name, value in fields.items()}


def ptxas_report(compiled: object, capability: int = 90) -> str:
    """What ``ptxas -v`` (bundled with Triton) says assembling a compiled kernel's PTX again:
    registers, barriers, and its warnings and performance notes (e.g. C7520: serialised
    wgmma; C7508: a ``setmaxnreg`` ignored)."""
    import subprocess
    import tempfile
    from pathlib import Path

    arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(compiled.asm["ptx"])  # type: ignore[attr-defined]
        return subprocess.run(
            [_nvidia_tool("ptxas"), f"-arch={arch}", "-v", str(source), "-o",
             str(Path(folder) / "k.cubin")],
            check=True, capture_output=True, text=True,
        ).stderr  # fmt: skip


def wgmma_serialization(compiled: object, capability: int = 90) -> str | None:
    """Why ``ptxas`` serialises the Hopper ``wgmma`` instructions of a compiled kernel (each
    waits for the one before: the matrix product's latency is paid once per instruction), or
    None if it does not (its performance note, e.g. C7520, in :func:`ptxas_report`)."""
    return serialization_reason(ptxas_report(compiled, capability))


def serialization_reason(ptxas_report: str) -> str | None:
    """The reason in ptxas's "wgmma.mma_async instructions are serialized due to …" note of a
    ``ptxas -v`` report, or None if there is no such note."""
    import re

    found = re.search(
        r"wgmma\.mma_async instructions are serialized due to (.*?)(?: in the function|$)",
        ptxas_report,
        flags=re.MULTILINE,
    )
    return found.group(1).strip() if found else None


def median_call_ms(call: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median milliseconds of ``repeats`` calls of ``call`` (at least one): on CUDA each timed
    by events around its queued kernels (no host wait between them), elsewhere by the wall
    clock. Used by :func:`tune_kernel_config` and ``benchmarks/search_tune.py``."""
    times = []
    for _ in range(max(1, repeats)):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            call()
            times.append(1000.0 * (time.perf_counter() - began))
    return statistics.median(times)


def tune_kernel_config(
    query: Tensor,
    memory: Tensor,
    k: int,
    *,
    configs: tuple[SearchKernelConfig, ...] | None = None,
    repeats: int = 10,
) -> list[tuple[SearchKernelConfig, float]]:
    """Time :func:`fused_knn_search` with each config on these inputs, make the fastest the
    default (:func:`set_kernel_config`) and return ``(config, milliseconds)`` fastest first.
    ``configs`` None: :data:`TUNED_CONFIGS` and the memory's device default (on Hopper the
    Gluon :data:`HOPPER_CONFIG`, which a tuning of the Triton configs alone would replace with
    a slower one).

    Each config's time is the median of ``repeats`` whole searches, its kernels queued back to
    back as in a training step: on CUDA timed by events (a host wait after each phase, as
    before session 12, added the launch gaps to every phase and moved a config's figure by up
    to 0.25 ms between runs on an H100), elsewhere by the wall clock.

    A config that fails to compile or launch (e.g. too much shared memory), whose candidate
    buffer overflows on these inputs (its results would need the scan), or whose neighbours
    differ from the exact PyTorch scan's (a warning names it: a compiler or kernel bug) is
    skipped.
    """
    from look.search import knn_search  # look.search imports this module

    exact = knn_search(query, memory, k, backend="torch").values
    if configs is None:
        device_default = _device_default_config(memory.device)
        configs = TUNED_CONFIGS + ((device_default,) if device_default not in TUNED_CONFIGS else ())
    results: list[tuple[SearchKernelConfig, float]] = []
    for config in configs:
        try:
            values, _, overflowed = fused_knn_search(query, memory, k, config=config)
        except Exception:  # an unbuildable config (e.g. too much shared memory) is skipped
            continue
        if bool(overflowed.any()):
            continue
        if not torch.allclose(values, exact, rtol=0, atol=1e-5, equal_nan=True):
            warnings.warn(
                f"kernel config {config} returned other neighbours than the exact scan; skipped",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        search = partial(fused_knn_search, query, memory, k, config=config)
        results.append((config, median_call_ms(search, repeats, memory.device)))
    if not results:
        raise RuntimeError("no kernel configuration could be built")
    results.sort(key=lambda item: item[1])
    set_kernel_config(results[0][0])
    return results
