"""The fused search's two passes as warp-specialised Gluon kernels for Hopper (sm_90).

Why: in the Triton kernel (:mod:`look.search_triton`) every 64-query block reads the whole
memory, so 256 queries pull it through L2 four times, and Hopper's wgmma reads the 64 × d query
block from shared memory again for every tile. Nsight Compute found L1/shared memory and L2 the
busiest units of both passes (session 12, docs/results.md), and larger query blocks in Triton
were slower: their warps wait at block-wide barriers. Triton's automatic warp specialisation
does not compile this loop (session 14: "unsupported load type for producer commit" on sm_90
with 4 warps; with 8 it compiles without specialising).

Here one thread block serves ``groups`` × 64 queries (4 × 64 = a 256-query batch) with:

- a **producer** warp that streams memory tiles into a ring of ``stages`` shared-memory
  buffers by bulk (TMA) copies, each announced by an mbarrier;
- ``groups`` **consumer** warpgroups, each holding its 64 queries in registers (wgmma's A
  operand: no shared-memory read of them per tile) and computing its 64 × ``block_n`` products
  from the shared tile. Each consumer frees a buffer for the producer (an mbarrier arrival,
  ``groups`` of them per buffer) once it is done with it (the bound pass right after its
  product, the collect pass after the tile's verdict), so the consumers drift apart by up to
  the ring's depth instead of meeting at a barrier.

So the memory is read once per ``groups`` × 64 queries, through one copy engine.

- **Bound pass** (every s-th tile): each consumer keeps, per query, the largest similarity in
  each of ``block_n`` bins (bin j: the rows at position j of their tiles), an element-wise
  maximum per tile: no reduction across the tile and no sorted list, unlike the Triton pass's
  largest tile maxima. The bins of all programs hold disjoint rows, so the k-th largest bin
  is attained by k distinct rows: a lower bound on the k-th neighbour. (Two of the top k rows
  in one bin make it a little looser than the Triton pass's, never wrong.) The bins go to the
  same radix select as the Triton pass's tile maxima.
- **Collect pass** (every tile): the similarities ``>=`` the widened bound go to the candidate
  buffers exactly as the Triton collect pass appends them (one relaxed atomic per candidate),
  and the selections and the overflow rule are the Triton search's.
  With ``tile_pairs`` (``SearchKernelConfig.gluon_tile_pairs``) each consumer takes its tiles
  two per turn of its loop, which leaves Triton's barrier analysis a barrier fewer to place
  per tile (:func:`_collect_pairs_partition`); the candidates are the same.

Rows past the end come back from the bulk copy as zeros and are masked (the bound pass's last
tile, the collect pass's append path); columns past ``dim`` are zeros on both sides.

Triton's CPU interpreter does not run Gluon kernels: on CPU these kernels are compiled for
sm_90 (``tests/test_search_gluon.py``: no spills, the register split, bulk copies, mbarriers,
per-warpgroup barriers only); what they compute is checked against the scan on a Hopper GPU
(``tests/test_search_gluon_cuda.py``, run by ``benchmarks/gpu_session.sh``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from look.search_triton import _cdiv, check_pair_release, compile_for_capability

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
    "GluonPass",
    "gluon_applies",
    "gluon_available",
    "gluon_bound_columns",
    "gluon_bound_pass",
    "gluon_collect_pass",
    "gluon_grid",
    "gluon_runs_on",
]

GROUP_QUERIES = 64  # queries per consumer warpgroup: the M of one wgmma
_PRODUCER_REGISTERS = 24  # the fewest a warpgroup may keep (setmaxnreg)
_REGISTERS_PER_SM = 65536


def gluon_available() -> bool:
    """Whether Triton's Gluon front end is importable."""
    return gluon is not None


def gluon_runs_on(device: torch.device) -> bool:
    """Whether the Gluon passes can run on ``device``: Gluon importable and a Hopper GPU (wgmma
    and bulk copies; sm_100 has other matrix instructions)."""
    return (
        gluon_available()
        and device.type == "cuda"
        and torch.cuda.get_device_capability(device)[0] == 9
    )


def gluon_applies(queries: Tensor, memory: Tensor) -> bool:
    """Whether the Gluon passes handle this search: a memory where they run
    (:func:`gluon_runs_on`), bf16/fp16 rows of at most 256 dims whose rows and base are 16-byte
    aligned (a bulk-copy descriptor needs it), and queries in the memory's dtype."""
    if memory.dtype not in (torch.bfloat16, torch.float16) or not gluon_runs_on(memory.device):
        return False
    return (
        queries.dtype == memory.dtype
        and memory.shape[1] <= 256
        and memory.stride(1) == 1
        and memory.stride(0) * memory.element_size() % 16 == 0
        and memory.data_ptr() % 16 == 0
    )


if gluon is not None:
    # Every partition takes the same arguments (Gluon's worker partitions must share one
    # signature): pointers and the descriptor, the ring (tiles, ready, empty), sizes, and
    # first_query, has_valid and widen_bound. A worker partition's arguments arrive as runtime
    # values, so flags are ints, and constexprs (tile sizes) are read off the ring's type.

    @gluon.jit
    def _producer_partition(
        query_ptr, memory_desc, valid_ptr, bound_ptr, tile_max_ptr, out_values_ptr,
        out_indices_ptr, counts_ptr, tiles, ready, empty, num_queries, num_rows, dim,
        stride_query, stride_bound, num_tiles, tile_step, capacity, bound_columns, first_query,
        has_valid, widen_bound,
    ):  # fmt: skip
        """Bulk-copy this program's tiles (every ``tile_step``-th tile of ``block_n`` rows:
        tiles p, p + P, … of the pass) into the ring: wait until every consumer has freed a
        buffer, then copy the next tile there; the copy itself completes ``ready``. With half
        as many ``empty`` barriers as buffers (a collect pass that frees its buffers a pair at
        a time), each covers two neighbouring buffers: one wait before each pair."""
        stages: gl.constexpr = tiles.type.shape[0]
        block_n: gl.constexpr = tiles.type.shape[1]
        per_release: gl.constexpr = stages // empty.type.shape[0]
        i = 0
        for tile in range(gl.program_id(1), num_tiles, gl.num_programs(1)):
            slot = i % stages
            # A fresh mbarrier counts as having completed the phase before its first: the
            # first pass over the ring does not wait.
            if per_release == 1:
                mbarrier.wait(empty.index(slot), ((i // stages) & 1) ^ 1)
            elif i % 2 == 0:
                mbarrier.wait(empty.index(slot // 2), ((i // stages) & 1) ^ 1)
            mbarrier.expect(ready.index(slot), memory_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(
                memory_desc, [tile * tile_step * block_n, 0], ready.index(slot),
                tiles.index(slot),
            )  # fmt: skip
            i += 1  # noqa: SIM113 (the JIT's loops have no enumerate)

    @gluon.jit
    def _query_operand(
        query_ptr, first_query, num_queries, stride_query, dim, products: gl.constexpr,
        block_d: gl.constexpr,
    ):  # fmt: skip
        """A consumer's 64 queries as wgmma's register operand (zeros past ``dim`` and the
        batch): loaded once, never read from shared memory."""
        operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=products, k_width=2)
        rows_q = first_query + gl.arange(0, 64, layout=gl.SliceLayout(1, operand))
        cols_d = gl.arange(0, block_d, layout=gl.SliceLayout(0, operand))
        return gl.load(
            query_ptr + rows_q[:, None] * stride_query + cols_d[None, :],
            mask=(rows_q < num_queries)[:, None] & (cols_d < dim)[None, :],
            other=0.0,
        )

    @gluon.jit
    def _held_product(query, tiles, ready, i, products):
        """Wait for the ``i``-th tile of this program and multiply it with the queries; the
        caller frees its buffer (one arrival of this consumer on ``empty``)."""
        stages: gl.constexpr = tiles.type.shape[0]
        block_n: gl.constexpr = tiles.type.shape[1]
        slot = i % stages
        mbarrier.wait(ready.index(slot), (i // stages) & 1)
        accumulator = gl.zeros([64, block_n], gl.float32, products)  # (ignored: use_acc=False)
        similarities = warpgroup_mma(
            query, tiles.index(slot).permute((1, 0)), accumulator, use_acc=False, is_async=True
        )
        return warpgroup_mma_wait(num_outstanding=0, deps=(similarities,))

    @gluon.jit
    def _product(query, tiles, ready, empty, i, products):
        """:func:`_held_product`, then its buffer freed (the product is in registers)."""
        similarities = _held_product(query, tiles, ready, i, products)
        mbarrier.arrive(empty.index(i % tiles.type.shape[0]), count=1)
        return similarities

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

    # Triton 3.6 names the barrier of a partition's threads thread_barrier, later ones barrier.
    _partition_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    _FLAGS_LAYOUT = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    # Each of a warpgroup's 4 warp verdicts in every thread: a reduction without shuffles.
    _EVERY_FLAG = gl.BlockedLayout([4], [32], [4], [0])

    @gluon.jit
    def _store_verdicts(similarities, bound, buffer):
        """Store in ``buffer`` each warp's verdict on a tile: whether any of its 16 queries'
        largest product reaches the query's bound (shuffles within the warp; gl.max ignores
        NaN, as a test per product does). Read after a barrier of the warpgroup by
        :func:`_any_verdict`: the reduction across warps that ``gl.max`` generates took three
        barriers and two chains of shuffles per tile, a third of the sampled stalls of the path
        every tile runs at 14.2M rows (session 22's Nsight Compute source view)."""
        passes = gl.max(similarities, axis=1) >= bound
        buffer.store(gl.max(passes.to(gl.int32).reshape([4, 16]), axis=1))

    @gluon.jit
    def _any_verdict(buffer):
        """Whether any warp of the warpgroup stored a passing verdict in ``buffer``: every
        thread reads the four in one load."""
        return gl.max(buffer.load(_EVERY_FLAG), axis=0) > 0

    @gluon.jit
    def _collect_bound(bound_ptr, offs_q, num_queries, stride_bound, widen_bound):
        """The consumer's queries' bounds (+inf for padding queries: they never append)."""
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
        return bound

    @gluon.jit
    def _collect_partition(
        query_ptr, memory_desc, valid_ptr, bound_ptr, tile_max_ptr, out_values_ptr,
        out_indices_ptr, counts_ptr, tiles, ready, empty, num_queries, num_rows, dim,
        stride_query, stride_bound, num_tiles, tile_step, capacity, bound_columns, first_query,
        has_valid, widen_bound,
    ):  # fmt: skip
        """A collect-pass consumer: queries ``first_query`` … ``+ 64`` against every tile of
        this program, appending the similarities ``>=`` the (widened) bound to their
        buffers, as the Triton collect pass does."""
        block_n: gl.constexpr = tiles.type.shape[1]
        products: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, block_n, 16]
        )
        query = _query_operand(
            query_ptr, first_query, num_queries, stride_query, dim, products, tiles.type.shape[2]
        )
        offs_q = first_query + gl.arange(0, 64, layout=gl.SliceLayout(1, products))
        bound = _collect_bound(bound_ptr, offs_q, num_queries, stride_bound, widen_bound)
        tile_rows = gl.arange(0, block_n, layout=gl.SliceLayout(0, products))
        # Each warp's verdict on a tile, in two buffers used in turn.
        flags = gl.allocate_shared_memory(gl.int32, [2, 4], _FLAGS_LAYOUT)
        i = 0
        stages: gl.constexpr = tiles.type.shape[0]
        for tile in range(gl.program_id(1), num_tiles, gl.num_programs(1)):
            similarities = _held_product(query, tiles, ready, i, products)
            # Most tiles of a large memory hold no candidate of any of these queries: whether
            # any query's largest product reaches its bound decides, for the warpgroup, whether
            # to number and store anything. The verdicts alternate between two buffers: a warp
            # can run at most one tile ahead of another (the barrier), so it never writes a
            # buffer that another is still to read.
            buffer = flags.index(i % 2)
            _store_verdicts(similarities, bound, buffer)
            _partition_barrier()
            append = _any_verdict(buffer)
            # The buffer is freed after the verdict: every warp's product is done by then.
            mbarrier.arrive(empty.index(i % stages), count=1)
            i += 1  # noqa: SIM113 (the JIT's loops have no enumerate)
            if append:
                _append_candidates(similarities, bound, tile, tile_rows, offs_q, valid_ptr,
                                   counts_ptr, out_values_ptr, out_indices_ptr, num_rows,
                                   capacity, has_valid, products)  # fmt: skip

    @gluon.jit
    def _collect_tile(query, tiles, ready, empty, flags, i, tile, bound, offs_q, tile_rows,
                      valid_ptr, counts_ptr, out_values_ptr, out_indices_ptr, num_rows,
                      capacity, has_valid, products: gl.constexpr, release_slot,
                      RELEASE: gl.constexpr):  # fmt: skip
        """The ``i``-th tile of a collect-pass consumer of :func:`_collect_pairs_partition`:
        its product, the warpgroup's verdict in ``flags`` (one of two separate buffers), with
        ``RELEASE`` an arrival on ``empty[release_slot]``, and the append if any query has a
        candidate. The arrival comes right after the verdict's barrier: every warp's product
        is done by then, and nothing read from shared memory since then is pending (Triton's
        barrier analysis would put a barrier before the arrival otherwise, as it puts one
        after it)."""
        similarities = _held_product(query, tiles, ready, i, products)
        _store_verdicts(similarities, bound, flags)
        _partition_barrier()
        if RELEASE:
            mbarrier.arrive(empty.index(release_slot), count=1)
        if _any_verdict(flags):
            _append_candidates(similarities, bound, tile, tile_rows, offs_q, valid_ptr,
                               counts_ptr, out_values_ptr, out_indices_ptr, num_rows, capacity,
                               has_valid, products)  # fmt: skip

    @gluon.jit
    def _collect_pairs_partition(
        query_ptr, memory_desc, valid_ptr, bound_ptr, tile_max_ptr, out_values_ptr,
        out_indices_ptr, counts_ptr, tiles, ready, empty, num_queries, num_rows, dim,
        stride_query, stride_bound, num_tiles, tile_step, capacity, bound_columns, first_query,
        has_valid, widen_bound,
    ):  # fmt: skip
        """:func:`_collect_partition` two tiles per turn of its loop (an odd count's last turn
        runs one), their verdicts in two separate shared allocations: Triton's barrier
        analysis tells allocations apart, not indices into one, so no barrier guards a
        verdict's store against the other tile's reads. Under Triton 3.6 (the lent GPU
        machine's) each tile then waits at two warpgroup barriers instead of three (session
        23, docs/results.md). A warp can run at most one tile ahead of another (the
        barriers), so it never writes a buffer that another is still to read.

        With half as many ``empty`` barriers as buffers the pair's two buffers are freed
        together, by one arrival after the second tile's verdict (the analysis puts a barrier
        after each arrival): one and a half barriers per tile."""
        block_n: gl.constexpr = tiles.type.shape[1]
        products: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, block_n, 16]
        )
        query = _query_operand(
            query_ptr, first_query, num_queries, stride_query, dim, products, tiles.type.shape[2]
        )
        offs_q = first_query + gl.arange(0, 64, layout=gl.SliceLayout(1, products))
        bound = _collect_bound(bound_ptr, offs_q, num_queries, stride_bound, widen_bound)
        tile_rows = gl.arange(0, block_n, layout=gl.SliceLayout(0, products))
        flags_even = gl.allocate_shared_memory(gl.int32, [4], _FLAGS_LAYOUT)
        flags_odd = gl.allocate_shared_memory(gl.int32, [4], _FLAGS_LAYOUT)
        first = gl.program_id(1)
        step = gl.num_programs(1)
        mine = (num_tiles - first + step - 1) // step  # this program's tiles
        stages: gl.constexpr = tiles.type.shape[0]
        paired: gl.constexpr = empty.type.shape[0] < stages
        # (the default partition, consumer 0, enters with the ring's initialisation pending in
        # the analysis, which does not see the barriers around the specialised region: without
        # one here it would put a barrier at the head of the loop, run every turn)
        _partition_barrier()
        for pair in range(0, (mine + 1) // 2):
            tile = first + 2 * pair * step
            slot = (2 * pair) % stages
            _collect_tile(query, tiles, ready, empty, flags_even, 2 * pair, tile, bound, offs_q,
                          tile_rows, valid_ptr, counts_ptr, out_values_ptr, out_indices_ptr,
                          num_rows, capacity, has_valid, products, slot, not paired)  # fmt: skip
            if 2 * pair + 1 < mine:
                _collect_tile(query, tiles, ready, empty, flags_odd, 2 * pair + 1, tile + step,
                              bound, offs_q, tile_rows, valid_ptr, counts_ptr, out_values_ptr,
                              out_indices_ptr, num_rows, capacity, has_valid, products,
                              slot // 2 if paired else (2 * pair + 1) % stages, True)  # fmt: skip
            else:
                # (an odd count's last turn: without a barrier on this path, the reads of the
                # even buffer, and an arrival, would still be pending at the loop's head, and
                # the analysis would put a barrier before every even tile's store or wait)
                _partition_barrier()
                if paired:
                    mbarrier.arrive(empty.index(slot // 2), count=1)
                    _partition_barrier()

    @gluon.jit
    def _append_candidates(similarities, bound, tile, tile_rows, offs_q, valid_ptr, counts_ptr,
                           out_values_ptr, out_indices_ptr, num_rows, capacity, has_valid,
                           products: gl.constexpr):  # fmt: skip
        """Append the tile's similarities ``>=`` their query's bound (rows past the end and,
        with a valid mask, unwritten rows left out) to the queries' buffers."""
        block_n: gl.constexpr = similarities.type.shape[1]
        keep = similarities >= bound[:, None]
        offs_n = tile * block_n + tile_rows
        row_ok = offs_n < num_rows  # the last tile's rows past the end are zeros
        if has_valid != 0:
            written = gl.load(valid_ptr + offs_n, mask=row_ok, other=0)
            row_ok = row_ok & (written != 0)
        keep = keep & row_ok[None, :]
        # One relaxed atomic per candidate numbers it in its query's buffer. The even and the
        # odd columns (each thread holds column pairs) go one after the other: half the
        # addresses live at once (48 bytes spilled otherwise).
        query_of = offs_q[:, None] + gl.zeros([64, block_n], gl.int32, products)
        indices = offs_n[None, :] + gl.zeros([64, block_n], gl.int32, products)
        pairs: gl.constexpr = [64, block_n // 2, 2]
        values_even, values_odd = similarities.reshape(pairs).split()
        keep_even, keep_odd = keep.reshape(pairs).split()
        query_even, query_odd = query_of.reshape(pairs).split()
        index_even, index_odd = indices.reshape(pairs).split()
        _append(values_even, keep_even, query_even, index_even, counts_ptr, out_values_ptr,
                out_indices_ptr, capacity)  # fmt: skip
        _append(values_odd, keep_odd, query_odd, index_odd, counts_ptr, out_values_ptr,
                out_indices_ptr, capacity)  # fmt: skip

    @gluon.jit
    def _bound_partition(
        query_ptr, memory_desc, valid_ptr, bound_ptr, tile_max_ptr, out_values_ptr,
        out_indices_ptr, counts_ptr, tiles, ready, empty, num_queries, num_rows, dim,
        stride_query, stride_bound, num_tiles, tile_step, capacity, bound_columns, first_query,
        has_valid, widen_bound,
    ):  # fmt: skip
        """A bound-pass consumer: over every ``tile_step``-th tile of this program, the
        largest similarity of each query in each of ``block_n`` bins, bin j holding the rows
        at position j of their tiles (an element-wise maximum per tile: no reduction across
        the tile, no sorted list). Bins of all programs hold disjoint rows, so the k-th
        largest of them is attained by k distinct rows: a lower bound on the k-th neighbour,
        as the Triton pass's k-th largest kept tile maximum is."""
        block_n: gl.constexpr = tiles.type.shape[1]
        products: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, block_n, 16]
        )
        query = _query_operand(
            query_ptr, first_query, num_queries, stride_query, dim, products, tiles.type.shape[2]
        )
        tile_rows = gl.arange(0, block_n, layout=gl.SliceLayout(0, products))
        bins = gl.full([64, block_n], float("-inf"), gl.float32, products)
        i = 0
        for tile in range(gl.program_id(1), num_tiles, gl.num_programs(1)):
            similarities = _product(query, tiles, ready, empty, i, products)
            i += 1  # noqa: SIM113 (the JIT's loops have no enumerate)
            first_row = tile * tile_step * block_n
            # Rows past the end (zeros from the bulk copy) and unwritten rows must not count:
            # masked on the last tile, and on every tile only with a valid mask.
            if (has_valid != 0) | (first_row + block_n > num_rows):
                offs_n = first_row + tile_rows
                row_ok = offs_n < num_rows
                if has_valid != 0:
                    written = gl.load(valid_ptr + offs_n, mask=row_ok, other=0)
                    row_ok = row_ok & (written != 0)
                similarities = gl.where(row_ok[None, :], similarities, float("-inf"))
            bins = gl.maximum(bins, similarities)
        offs_q = first_query + gl.arange(0, 64, layout=gl.SliceLayout(1, products))
        columns = gl.program_id(1) * block_n + tile_rows
        gl.store(
            tile_max_ptr + offs_q[:, None] * bound_columns + columns[None, :],
            bins,
            mask=(offs_q < num_queries)[:, None] & (columns < bound_columns)[None, :],
        )

    @gluon.jit
    def _shared_tiles_kernel(
        query_ptr, memory_desc, valid_ptr, bound_ptr, tile_max_ptr, out_values_ptr,
        out_indices_ptr, counts_ptr, num_queries, num_rows, dim, stride_query, stride_bound,
        num_tiles, tile_step, capacity, bound_columns, has_valid,
        COLLECT: gl.constexpr, WIDEN_BOUND: gl.constexpr,
        GROUPS: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGISTERS: gl.constexpr,
        PAIRS: gl.constexpr,
    ):  # fmt: skip
        """Program (q, p): queries [q·GROUPS·64, …) against the pass's tiles p, p + P, … (so
        the programs of all query blocks read the same tile at about the same time). The
        bound pass (``COLLECT`` False) writes each consumer's bins, the collect pass appends
        candidates, one tile per turn of its loop or (``PAIRS`` 1) two, freeing the ring's
        buffers one at a time or (``PAIRS`` 2) a pair at a time. ``has_valid`` (1: read
        the valid mask) is a runtime argument: as a
        constexpr 0 it left ``valid_ptr`` unused in every partition, and Triton 3.6 (the lent
        GPU machine's) then failed an LLVM assertion lowering the specialised region."""
        block_n: gl.constexpr = memory_desc.block_type.shape[0]
        block_d: gl.constexpr = memory_desc.block_type.shape[1]
        tiles = gl.allocate_shared_memory(
            memory_desc.dtype, [STAGES, block_n, block_d], memory_desc.layout
        )
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        # (PAIRS 2: a collect pass freeing its buffers a pair at a time)
        releases: gl.constexpr = STAGES // 2 if COLLECT and PAIRS == 2 else STAGES
        empty = gl.allocate_shared_memory(gl.int64, [releases, 1], mbarrier.MBarrierLayout())
        for stage in gl.static_range(STAGES):
            mbarrier.init(ready.index(stage), count=1)  # completed by the copy's bytes
            if stage < releases:
                mbarrier.init(empty.index(stage), count=GROUPS)  # one arrival per consumer
        shared = (query_ptr, memory_desc, valid_ptr, bound_ptr, tile_max_ptr, out_values_ptr,
                  out_indices_ptr, counts_ptr, tiles, ready, empty, num_queries, num_rows, dim,
                  stride_query, stride_bound, num_tiles, tile_step, capacity,
                  bound_columns)  # fmt: skip
        first = gl.program_id(0) * GROUPS * 64
        widen_bound = 1 if WIDEN_BOUND else 0
        # One argument tuple per consumer (its first query differs); the default partition is
        # consumer 0, the workers the other consumers and the producer (one warp). (Tuples
        # concatenated: the JIT does not unpack starred arguments.)
        group_0 = shared + (first, has_valid, widen_bound)  # noqa: RUF005
        group_1 = shared + (first + 64, has_valid, widen_bound)  # noqa: RUF005
        group_2 = shared + (first + 128, has_valid, widen_bound)  # noqa: RUF005
        group_3 = shared + (first + 192, has_valid, widen_bound)  # noqa: RUF005
        # (each partition list names its function: the JIT passes no function as a value)
        gl.static_assert((GROUPS == 2) | (GROUPS == 4), "GROUPS must be 2 or 4")
        if COLLECT and PAIRS:
            if GROUPS == 2:
                gl.warp_specialize(
                    [(_collect_pairs_partition, group_0), (_collect_pairs_partition, group_1),
                     (_producer_partition, group_0)],
                    [4, 1], [CONSUMER_REGISTERS, 24],
                )  # fmt: skip
            else:
                gl.warp_specialize(
                    [(_collect_pairs_partition, group_0), (_collect_pairs_partition, group_1),
                     (_collect_pairs_partition, group_2), (_collect_pairs_partition, group_3),
                     (_producer_partition, group_0)],
                    [4, 4, 4, 1],
                    [CONSUMER_REGISTERS, CONSUMER_REGISTERS, CONSUMER_REGISTERS, 24],
                )  # fmt: skip
        elif COLLECT:
            if GROUPS == 2:
                gl.warp_specialize(
                    [(_collect_partition, group_0), (_collect_partition, group_1),
                     (_producer_partition, group_0)],
                    [4, 1], [CONSUMER_REGISTERS, 24],
                )  # fmt: skip
            else:
                gl.warp_specialize(
                    [(_collect_partition, group_0), (_collect_partition, group_1),
                     (_collect_partition, group_2), (_collect_partition, group_3),
                     (_producer_partition, group_0)],
                    [4, 4, 4, 1],
                    [CONSUMER_REGISTERS, CONSUMER_REGISTERS, CONSUMER_REGISTERS, 24],
                )  # fmt: skip
        elif GROUPS == 2:
            gl.warp_specialize(
                [(_bound_partition, group_0), (_bound_partition, group_1),
                 (_producer_partition, group_0)],
                [4, 1], [CONSUMER_REGISTERS, 24],
            )  # fmt: skip
        else:
            gl.warp_specialize(
                [(_bound_partition, group_0), (_bound_partition, group_1),
                 (_bound_partition, group_2), (_bound_partition, group_3),
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
class GluonPass:
    """One launch of a Gluon pass: arguments, grid and compile options (the launch and
    :meth:`compile` build from the same values, as the Triton passes do)."""

    arguments: tuple[object, ...]
    constexprs: dict[str, object]
    grid: tuple[int, int]
    maxnreg: int

    @property
    def has_valid(self) -> bool:
        """Whether the pass reads a valid mask (its last argument, a runtime flag)."""
        return bool(self.arguments[-1])

    def launch(self) -> None:
        _shared_tiles_kernel[self.grid](
            *self.arguments, **self.constexprs, num_warps=4, maxnreg=self.maxnreg
        )

    def compile(self, capability: int = 90) -> object:
        """Compile for ``capability`` without a GPU (``arguments`` on the meta device)."""
        return compile_for_capability(
            _shared_tiles_kernel, self.arguments, self.constexprs, capability,
            num_warps=4, num_stages=1, maxnreg=self.maxnreg,
        )  # fmt: skip


def gluon_grid(batch: int, num_tiles: int, groups: int, multiprocessors: int) -> tuple[int, int, int]:
    """``(groups, query blocks, programs per query block)`` of a pass over ``num_tiles``
    tiles: at most ``groups`` warpgroups of 64 queries per block (fewer for a small batch),
    and one block per SM over all query blocks (their registers fill an SM)."""
    if groups not in (2, 4):
        raise ValueError(f"query groups must be 2 or 4, got {groups}")
    # (a batch of at most 128 queries takes two groups, idle ones masked)
    groups = 2 if batch <= 2 * GROUP_QUERIES else groups
    query_blocks = _cdiv(batch, groups * GROUP_QUERIES)
    programs = max(1, min(num_tiles, multiprocessors // query_blocks))
    return groups, query_blocks, programs


def gluon_bound_columns(
    batch: int, sampled_tiles: int, *, block_n: int, groups: int, multiprocessors: int
) -> int:
    """Columns of the Gluon bound pass's output: ``block_n`` bins per program."""
    return gluon_grid(batch, sampled_tiles, groups, multiprocessors)[2] * block_n


def _gluon_pass(
    queries: Tensor, memory: Tensor, valid: Tensor | None, pointers: tuple[Tensor, ...],
    sizes: tuple[int, ...], *, collect: bool, widen_bound: bool, num_tiles: int, block_n: int,
    stages: int, groups: int, multiprocessors: int, tile_pairs: bool = False,
    pair_release: bool = False,
) -> GluonPass:  # fmt: skip
    if gluon is None:
        raise RuntimeError("Triton's Gluon front end is not installed")
    batch, dim = queries.shape
    groups, query_blocks, programs = gluon_grid(batch, num_tiles, groups, multiprocessors)
    block_d = max(16, triton.next_power_of_2(dim))
    element = gl.bfloat16 if memory.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([block_n, block_d], element)
    descriptor = TensorDescriptor(
        memory, list(memory.shape), list(memory.stride()), [block_n, block_d], layout
    )
    launch_registers, consumer_registers = _register_split(groups)
    arguments = (
        queries, descriptor, valid if valid is not None else queries, *pointers, batch,
        memory.shape[0], dim, queries.stride(0), *sizes, int(valid is not None),
    )  # fmt: skip
    constexprs: dict[str, object] = {
        "COLLECT": collect,
        "WIDEN_BOUND": widen_bound,
        "GROUPS": groups,
        "STAGES": stages,
        "CONSUMER_REGISTERS": consumer_registers,
        "PAIRS": (2 if pair_release else 1) if tile_pairs else 0,
    }
    return GluonPass(arguments, constexprs, (query_blocks, programs), launch_registers)


def gluon_bound_pass(
    queries: Tensor,
    memory: Tensor,
    valid: Tensor | None,
    tile_max: Tensor,
    *,
    sampled_tiles: int,
    tile_step: int,
    block_n: int,
    stages: int,
    groups: int,
    multiprocessors: int,
) -> GluonPass:
    """The bound pass of :func:`look.search_triton.fused_knn_search` over every
    ``tile_step``-th tile of ``block_n`` rows (``sampled_tiles`` of them): ``tile_max`` (B ×
    :func:`gluon_bound_columns`) receives each program's bins, whose k-th largest per query
    is the bound (its selection is the Triton search's)."""
    dummy = tile_max
    return _gluon_pass(
        queries, memory, valid, (dummy, tile_max, dummy, dummy, dummy),
        (1, sampled_tiles, tile_step, 0, tile_max.shape[1]),
        collect=False, widen_bound=False, num_tiles=sampled_tiles, block_n=block_n,
        stages=stages, groups=groups, multiprocessors=multiprocessors,
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
    tile_pairs: bool = False,
    pair_release: bool = False,
) -> GluonPass:
    """The collect pass of :func:`look.search_triton.fused_knn_search` over every tile of
    ``block_n`` rows: its outputs ``out_values``/``out_indices`` (rows of ``capacity`` slots)
    and ``counts``. ``groups`` (1, 2 or 4) consumer warpgroups of 64 queries share each tile;
    fewer are used when the batch has fewer queries. ``bound`` is the k-th largest bin or tile
    maximum per query (a column view: its stride is passed), widened in the kernel with
    ``widen_bound``. ``tile_pairs``: two tiles per turn of each consumer's loop
    (:func:`_collect_pairs_partition`: a barrier fewer per tile), and with ``pair_release``
    the ring's buffers freed a pair at a time (half a barrier fewer again); the same
    candidates."""
    check_pair_release(tile_pairs, pair_release, stages)
    num_tiles = _cdiv(memory.shape[0], block_n)
    return _gluon_pass(
        queries, memory, valid, (bound, bound, out_values, out_indices, counts),
        (bound.stride(0), num_tiles, 1, out_values.shape[1], 0),
        collect=True, widen_bound=widen_bound, num_tiles=num_tiles, block_n=block_n,
        stages=stages, groups=groups, multiprocessors=multiprocessors, tile_pairs=tile_pairs,
        pair_release=pair_release,
    )  # fmt: skip
