"""The fused search's collect pass as a warp-specialised Gluon kernel for Hopper (sm_90).

Why: in the Triton kernel (:mod:`look.search_triton`) every 64-query block reads the whole
memory, so 256 queries pull it through L2 four times, and Hopper's wgmma reads the 64 × d query
block from shared memory again for every tile. Nsight Compute found L1/shared memory and L2 the
busiest units of the collect pass (session 12, docs/results.md), and larger query blocks in
Triton were slower: their warps wait at block-wide barriers. Triton's automatic warp
specialisation does not compile this loop (session 14: "unsupported load type for producer
commit" on sm_90 with 4 warps; with 8 it compiles without specialising).

Here one thread block serves ``groups`` × 64 queries (4 × 64 = a 256-query batch) with:

- a **producer** warp that streams memory tiles into a ring of ``stages`` shared-memory
  buffers by bulk (TMA) copies, each announced by an mbarrier;
- ``groups`` **consumer** warpgroups, each holding its 64 queries in registers (wgmma's A
  operand: no shared-memory read of them per tile), computing its 64 × ``block_n`` products
  from the shared tile and appending the similarities ``>=`` the bound to the candidate
  buffers, exactly as the Triton collect pass does. Each consumer frees a buffer for the
  producer (an mbarrier arrival, ``groups`` of them per buffer) right after its product, so
  the consumers drift apart by up to the ring's depth instead of meeting at a barrier.

So the memory is read once per ``groups`` × 64 queries, through one copy engine, and the
outputs (candidate values, row indices, per-query counts) are those of the Triton collect
pass: the bound pass, the selections and the overflow rule are shared. Rows past the end
come back from the bulk copy as zeros and are masked on the append path; columns past ``dim``
are zeros on both sides.

Triton's CPU interpreter does not run Gluon kernels: on CPU this kernel is compiled for sm_90
(the tests check it assembles without spills to local memory beyond a few loop values, with
its register split); its results are checked against the scan on a GPU
(``tests/test_search_cuda.py``, ``benchmarks/gpu_session.sh``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

try:  # Gluon ships with Triton 3.4+ (experimental); older or CPU-only installs lack it.
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installation
    gluon = None  # type: ignore[assignment]

__all__ = [
    "GROUP_QUERIES",
    "GluonCollectPass",
    "gluon_available",
    "gluon_collect_applies",
    "gluon_collect_pass",
]

GROUP_QUERIES = 64  # queries per consumer warpgroup: the M of one wgmma
_PRODUCER_REGISTERS = 24  # the fewest a warpgroup may keep (setmaxnreg)
_REGISTERS_PER_SM = 65536


def gluon_available() -> bool:
    """Whether Triton's Gluon front end is importable."""
    return gluon is not None


def gluon_collect_applies(queries: Tensor, memory: Tensor) -> bool:
    """Whether :func:`gluon_collect_pass` handles this search: Gluon, a CUDA memory on a Hopper
    GPU (wgmma and bulk copies; sm_100 has other matrix instructions), bf16/fp16 rows of at most
    256 dims whose rows and base are 16-byte aligned (a bulk-copy descriptor needs it), and
    queries in the memory's dtype."""
    if gluon is None or not memory.is_cuda or memory.dtype not in (torch.bfloat16, torch.float16):
        return False
    if torch.cuda.get_device_capability(memory.device)[0] != 9:
        return False
    return (
        queries.dtype == memory.dtype
        and memory.shape[1] <= 256
        and memory.stride(1) == 1
        and memory.stride(0) * memory.element_size() % 16 == 0
        and memory.data_ptr() % 16 == 0
    )


if gluon is not None:

    @gluon.jit
    def _producer_partition(
        query_ptr, memory_desc, valid_ptr, bound_ptr, out_values_ptr, out_indices_ptr,
        counts_ptr, tiles, ready, empty, num_queries, num_rows, dim, stride_query, stride_bound,
        num_tiles, capacity, first_query, has_valid, widen_bound,
    ):  # fmt: skip
        """Bulk-copy this program's tiles into the ring: wait until every consumer has freed a
        buffer, then copy the next tile there; the copy itself completes ``ready``. (Same
        signature as the consumers: Gluon's worker partitions must share one.)"""
        stages: gl.constexpr = tiles.type.shape[0]
        block_n: gl.constexpr = tiles.type.shape[1]
        i = 0
        for tile in range(gl.program_id(1), num_tiles, gl.num_programs(1)):
            slot = i % stages
            # A fresh mbarrier counts as having completed the phase before its first: the
            # first pass over the ring does not wait.
            mbarrier.wait(empty.index(slot), ((i // stages) & 1) ^ 1)
            mbarrier.expect(ready.index(slot), memory_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(
                memory_desc, [tile * block_n, 0], ready.index(slot), tiles.index(slot)
            )
            i += 1  # noqa: SIM113 (the JIT's loops have no enumerate)

    @gluon.jit
    def _append(values, keep, query_of, indices, counts_ptr, out_values_ptr, out_indices_ptr,
                capacity):  # fmt: skip
        """Append the ``keep`` entries to their queries' buffers: one relaxed atomic per
        candidate takes its slot."""
        ones = gl.full(values.shape, 1, gl.int32, values.type.layout)
        slots = gl.atomic_add(counts_ptr + query_of, ones, mask=keep, sem="relaxed")
        store = keep & (slots < capacity)
        destination = query_of * capacity + slots
        gl.store(out_values_ptr + destination, values, mask=store)
        gl.store(out_indices_ptr + destination, indices.to(gl.int64), mask=store)

    @gluon.jit
    def _consumer_partition(
        query_ptr, memory_desc, valid_ptr, bound_ptr, out_values_ptr, out_indices_ptr,
        counts_ptr, tiles, ready, empty, num_queries, num_rows, dim, stride_query, stride_bound,
        num_tiles, capacity, first_query, has_valid, widen_bound,
    ):  # fmt: skip
        """One warpgroup: queries ``first_query`` … ``+ 64`` against every tile of this
        program, appending the similarities ``>=`` the (widened) bound to their buffers. Flags
        arrive as ints: a worker partition's arguments are runtime values, and tile sizes are
        read off the ring's type."""
        stages: gl.constexpr = tiles.type.shape[0]
        block_n: gl.constexpr = tiles.type.shape[1]
        block_d: gl.constexpr = tiles.type.shape[2]
        products: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, block_n, 16]
        )
        # The queries as wgmma's register operand (loaded once; zeros past dim and the batch).
        operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=products, k_width=2)
        rows_q = first_query + gl.arange(0, 64, layout=gl.SliceLayout(1, operand))
        cols_d = gl.arange(0, block_d, layout=gl.SliceLayout(0, operand))
        query = gl.load(
            query_ptr + rows_q[:, None] * stride_query + cols_d[None, :],
            mask=(rows_q < num_queries)[:, None] & (cols_d < dim)[None, :],
            other=0.0,
        )
        offs_q = first_query + gl.arange(0, 64, layout=gl.SliceLayout(1, products))
        q_mask = offs_q < num_queries
        bound = gl.load(bound_ptr + offs_q * stride_bound, mask=q_mask, other=float("inf"))
        if widen_bound != 0:
            # As the Triton collect pass (WIDEN_BOUND): lowered by 2**-20 of itself for the
            # two passes' rounding; fewer than k sampled candidates (-inf) take the lowest
            # finite value; padding queries keep +inf (never append).
            finite = gl.abs(bound) < float("inf")
            finite_bound = gl.where(finite, bound, 0.0)
            widened = gl.where(finite, finite_bound - gl.abs(finite_bound) * 9.5367431640625e-07,
                               -3.4028234663852886e38)  # fmt: skip
            bound = gl.where(q_mask, widened, float("inf"))
        accumulator = gl.zeros([64, block_n], gl.float32, products)  # (ignored: use_acc=False)
        tile_rows = gl.arange(0, block_n, layout=gl.SliceLayout(0, products))
        i = 0
        for tile in range(gl.program_id(1), num_tiles, gl.num_programs(1)):
            slot = i % stages
            mbarrier.wait(ready.index(slot), (i // stages) & 1)
            similarities = warpgroup_mma(
                query, tiles.index(slot).permute((1, 0)), accumulator, use_acc=False,
                is_async=True,
            )  # fmt: skip
            similarities = warpgroup_mma_wait(num_outstanding=0, deps=(similarities,))
            # The product is in registers: the buffer may be refilled.
            mbarrier.arrive(empty.index(slot), count=1)
            i += 1  # noqa: SIM113 (the JIT's loops have no enumerate)
            keep = similarities >= bound[:, None]
            # Most tiles of a large memory hold no candidate of any of these queries: one
            # reduction over the warpgroup decides whether to number and store anything.
            if gl.max(gl.max(keep.to(gl.int32), axis=1), axis=0) > 0:
                offs_n = tile * block_n + tile_rows
                row_ok = offs_n < num_rows  # the last tile's rows past the end are zeros
                if has_valid != 0:
                    written = gl.load(valid_ptr + offs_n, mask=row_ok, other=0)
                    row_ok = row_ok & (written != 0)
                keep = keep & row_ok[None, :]
                # One relaxed atomic per candidate numbers it in its query's buffer. The even
                # and the odd columns (each thread holds column pairs) go one after the other:
                # half the addresses live at once.
                query_of = offs_q[:, None] + gl.zeros([64, block_n], gl.int32, products)
                indices = offs_n[None, :] + gl.zeros([64, block_n], gl.int32, products)
                pairs: gl.constexpr = [64, block_n // 2, 2]
                values_even, values_odd = similarities.reshape(pairs).split()
                keep_even, keep_odd = keep.reshape(pairs).split()
                query_even, query_odd = query_of.reshape(pairs).split()
                index_even, index_odd = indices.reshape(pairs).split()
                _append(values_even, keep_even, query_even, index_even, counts_ptr,
                        out_values_ptr, out_indices_ptr, capacity)  # fmt: skip
                _append(values_odd, keep_odd, query_odd, index_odd, counts_ptr,
                        out_values_ptr, out_indices_ptr, capacity)  # fmt: skip

    @gluon.jit
    def _collect_shared_tiles_kernel(
        query_ptr, memory_desc, valid_ptr, bound_ptr, out_values_ptr, out_indices_ptr,
        counts_ptr, num_queries, num_rows, dim, stride_query, stride_bound, num_tiles, capacity,
        HAS_VALID: gl.constexpr, WIDEN_BOUND: gl.constexpr, GROUPS: gl.constexpr,
        STAGES: gl.constexpr, CONSUMER_REGISTERS: gl.constexpr,
    ):  # fmt: skip
        """Program (q, p): queries [q·GROUPS·64, …) against tiles p, p + P, p + 2P, … (so the
        programs of all query blocks read the same tile at about the same time)."""
        block_n: gl.constexpr = memory_desc.block_type.shape[0]
        block_d: gl.constexpr = memory_desc.block_type.shape[1]
        tiles = gl.allocate_shared_memory(
            memory_desc.dtype, [STAGES, block_n, block_d], memory_desc.layout
        )
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for stage in gl.static_range(STAGES):
            mbarrier.init(ready.index(stage), count=1)  # completed by the copy's bytes
            mbarrier.init(empty.index(stage), count=GROUPS)  # one arrival per consumer
        first = gl.program_id(0) * GROUPS * 64
        has_valid = 1 if HAS_VALID else 0
        widen_bound = 1 if WIDEN_BOUND else 0
        # One argument tuple per consumer (its first query differs); the default partition is
        # consumer 0, the workers the other consumers and the producer (one warp).
        shared = (query_ptr, memory_desc, valid_ptr, bound_ptr, out_values_ptr,
                  out_indices_ptr, counts_ptr, tiles, ready, empty, num_queries, num_rows, dim,
                  stride_query, stride_bound, num_tiles, capacity)  # fmt: skip
        # (tuples concatenated: the JIT does not unpack starred arguments)
        group_0 = shared + (first, has_valid, widen_bound)  # noqa: RUF005
        group_1 = shared + (first + 64, has_valid, widen_bound)  # noqa: RUF005
        group_2 = shared + (first + 128, has_valid, widen_bound)  # noqa: RUF005
        group_3 = shared + (first + 192, has_valid, widen_bound)  # noqa: RUF005
        if GROUPS == 1:
            gl.warp_specialize(
                [(_consumer_partition, group_0), (_producer_partition, group_0)],
                [1], [24],
            )  # fmt: skip
        elif GROUPS == 2:
            gl.warp_specialize(
                [(_consumer_partition, group_0), (_consumer_partition, group_1),
                 (_producer_partition, group_0)],
                [4, 1], [CONSUMER_REGISTERS, 24],
            )  # fmt: skip
        else:
            gl.static_assert(GROUPS == 4, "GROUPS must be 1, 2 or 4")
            gl.warp_specialize(
                [(_consumer_partition, group_0), (_consumer_partition, group_1),
                 (_consumer_partition, group_2), (_consumer_partition, group_3),
                 (_producer_partition, group_0)],
                [4, 4, 4, 1], [CONSUMER_REGISTERS, CONSUMER_REGISTERS, CONSUMER_REGISTERS, 24],
            )  # fmt: skip


def _register_split(groups: int) -> tuple[int, int]:
    """Registers per thread at launch (``maxnreg``) and per consumer worker after the split.

    One thread block per SM: ``groups`` consumer warpgroups plus the producer's (a warp, but
    registers go by warpgroup) share the SM's 64k registers. The producer drops to 24 per
    thread; the worker consumers take an equal share of the rest (multiples of 8), and the
    default partition (consumer 0) keeps what is left, at least as much."""
    warpgroups = groups + 1
    launch = min(255, _REGISTERS_PER_SM // (warpgroups * 128)) // 8 * 8
    consumer = (launch * warpgroups - _PRODUCER_REGISTERS) // groups // 8 * 8
    return launch, consumer


@dataclass(frozen=True)
class GluonCollectPass:
    """One launch of the Gluon collect pass: arguments, grid and compile options (the launch
    and :meth:`compile` build from the same values, as the Triton passes do)."""

    arguments: tuple[object, ...]
    constexprs: dict[str, object]
    grid: tuple[int, int]
    maxnreg: int

    def launch(self) -> None:
        _collect_shared_tiles_kernel[self.grid](
            *self.arguments, **self.constexprs, num_warps=4, maxnreg=self.maxnreg
        )

    def compile(self, capability: int = 90) -> object:
        """Compile for ``capability`` without a GPU (``arguments`` on the meta device)."""
        from look.search_triton import compile_for_capability

        return compile_for_capability(
            _collect_shared_tiles_kernel, self.arguments, self.constexprs, capability,
            num_warps=4, num_stages=1, maxnreg=self.maxnreg,
        )  # fmt: skip


def gluon_collect_pass(
    queries: Tensor,
    memory: Tensor,
    valid: Tensor | None,
    bound: Tensor,
    out_values: Tensor,
    out_indices: Tensor,
    counts: Tensor,
    *,
    block_n: int,
    stages: int,
    groups: int,
    widen_bound: bool,
    multiprocessors: int,
) -> GluonCollectPass:
    """The collect pass of :func:`look.search_triton.fused_knn_search` over ``memory`` (its
    outputs: ``out_values``/``out_indices`` rows of ``capacity`` slots and ``counts``).

    ``groups`` (1, 2 or 4) consumer warpgroups of 64 queries share each tile; fewer are used
    when the batch has fewer queries. ``bound`` is the bound pass's k-th largest tile maximum
    per query (a column view: its stride is passed), widened in the kernel with
    ``widen_bound``."""
    if gluon is None:
        raise RuntimeError("Triton's Gluon front end is not installed")
    if groups not in (1, 2, 4):
        raise ValueError(f"query groups must be 1, 2 or 4, got {groups}")
    batch, dim = queries.shape
    groups = min(groups, triton.next_power_of_2(triton.cdiv(batch, GROUP_QUERIES)))
    block_d = max(16, triton.next_power_of_2(dim))
    element = gl.bfloat16 if memory.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([block_n, block_d], element)
    descriptor = TensorDescriptor(
        memory, list(memory.shape), list(memory.stride()), [block_n, block_d], layout
    )
    num_tiles = triton.cdiv(memory.shape[0], block_n)
    query_blocks = triton.cdiv(batch, groups * GROUP_QUERIES)
    programs = max(1, min(num_tiles, multiprocessors // query_blocks))
    launch_registers, consumer_registers = _register_split(groups)
    arguments = (
        queries, descriptor, valid if valid is not None else queries, bound, out_values,
        out_indices, counts, batch, memory.shape[0], dim, queries.stride(0), bound.stride(0),
        num_tiles, out_values.shape[1],
    )  # fmt: skip
    constexprs: dict[str, object] = {
        "HAS_VALID": valid is not None,
        "WIDEN_BOUND": widen_bound,
        "GROUPS": groups,
        "STAGES": stages,
        "CONSUMER_REGISTERS": consumer_registers,
    }
    return GluonCollectPass(arguments, constexprs, (query_blocks, programs), launch_registers)

