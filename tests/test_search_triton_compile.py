"""Every kernel configuration the tuner may pick compiles for Hopper (sm_90) and Ampere (sm_80),
without a GPU: Triton lowers the kernel to PTX and its bundled ptxas assembles it.

Triton's CPU interpreter (tests/test_search_triton.py) checks what the kernel computes, not whether
the compiler accepts it; a kernel the compiler rejects would only show on a GPU (the search then
falls back to the slow scan). The collect pass's per-candidate atomic, for one, first hit an
assertion in Triton 3.8's layout pass."""

from __future__ import annotations

import re

import pytest

from look.search_triton import (
    KERNEL_CONFIGS,
    SearchKernelConfig,
    compile_kernel,
    compile_prefilter_kernels,
    compile_selection_kernels,
    cubin_resources,
    serialization_reason,
    triton_available,
    wgmma_serialization,
)

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")

# Dynamic shared memory per block: H100, A100, T4 (Turing), B200 (Blackwell).
_SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 75: 64 * 1024, 100: 227 * 1024}


def _unique_passes() -> list[tuple[SearchKernelConfig, bool]]:
    """Each distinct compiled kernel once (the bound pass ignores the collect settings)."""
    seen: set[tuple[object, ...]] = set()
    passes = []
    for config in KERNEL_CONFIGS:
        for collect in (False, True):
            key: tuple[object, ...] = (
                config.block_q, config.block_n, config.num_warps, config.num_stages, collect,
                config.loads,
            )  # fmt: skip
            if collect:
                key += (config.collect, config.skip_empty_tiles)
            else:
                key += (config.bound_bins,)
            if config.kernel == "gluon":  # both passes are Gluon's
                key += (config.kernel, config.gluon_groups)
            if key not in seen:
                seen.add(key)
                passes.append((config, collect))
    return passes


def _shared_memory(
    config: SearchKernelConfig, *, collect: bool, capability: int, dtype: str = "bf16"
) -> int:
    compiled = compile_kernel(config, collect=collect, capability=capability, dtype=dtype)
    assert compiled.asm["cubin"], "ptxas produced no binary"  # type: ignore[attr-defined]
    return int(compiled.metadata.shared)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("config", "collect"),
    _unique_passes(),
    ids=lambda value: str(value) if isinstance(value, bool) else "-",
)
def test_every_tuner_config_compiles_for_hopper(config: SearchKernelConfig, collect: bool) -> None:
    compiled = compile_kernel(config, collect=collect, capability=90)
    assert compiled.asm["cubin"], "ptxas produced no binary"  # type: ignore[attr-defined]
    if config == KERNEL_CONFIGS[0]:  # the default must also fit; the tuner skips others that don't
        assert int(compiled.metadata.shared) <= _SHARED_MEMORY_LIMIT[90]  # type: ignore[attr-defined]
    # ptxas keeps the pass's wgmma in flight together (none waits for the one before).
    assert wgmma_serialization(compiled) is None


@pytest.mark.parametrize("collect", [False, True])
@pytest.mark.parametrize(
    ("capability", "dtype"),
    [(80, "bf16"), (75, "fp16"), (100, "bf16")],  # fp16 only before Ampere (no bf16 MMA)
)
def test_default_config_compiles_for_other_gpus(capability: int, dtype: str, collect: bool) -> None:
    shared = _shared_memory(KERNEL_CONFIGS[0], collect=collect, capability=capability, dtype=dtype)
    assert shared <= _SHARED_MEMORY_LIMIT[capability]


@pytest.mark.parametrize("capability", [90, 80])
def test_fused_selections_compile_without_spilling(capability: int) -> None:
    """The bound's radix select and the candidates' in-register sort (4,096 packed int64 keys
    over 8 warps; with s = 8 at 14.2M rows, 8,192 over 16 warps) of the default search, as a
    256-query, k = 200 search launches them."""
    stride_8 = next(config for config in KERNEL_CONFIGS if config.tile_stride == 8)
    bins = next(config for config in KERNEL_CONFIGS if config.bound_bins)
    for compiled in (
        *compile_selection_kernels(capability),
        *compile_selection_kernels(capability, rows=14_197_122, config=stride_8),
        # The bound pass's bins: 264 programs × 32 columns, a radix select over 16,384 slots
        # (Hopper only: 14 s of compiling on the CI machine).
        *(
            compile_selection_kernels(capability, rows=14_197_122, config=bins)[:1]
            if capability == 90
            else ()
        ),
    ):
        resources = cubin_resources(compiled.asm["cubin"])  # type: ignore[attr-defined]
        assert resources.get("stack", 0) == 0 and resources.get("local", 0) == 0, resources


def test_the_candidates_sort_sizes_follow_the_buffer() -> None:
    from look.search_triton import (
        _FUSED_CANDIDATES,
        _fused_select_applies,
        _search_plan,
        _selection_launch,
        _small_selection_block,
    )

    stride_8 = next(config for config in KERNEL_CONFIGS if config.tile_stride == 8)
    for config, rows, block, warps, small in (
        (KERNEL_CONFIGS[0], 14_197_122, 4096, 8, 1024),  # s = 4: 3,216 slots
        (stride_8, 14_197_122, 8192, 16, 2048),  # s = 8: 6,432 slots
    ):
        capacity = _search_plan(256, rows, 201, config, multiprocessors=132).capacity
        assert _selection_launch(capacity, bound=False) == (block, warps)
        assert _fused_select_applies("fused", capacity, _FUSED_CANDIDATES)
        assert _small_selection_block(block, 200) == small
    assert not _fused_select_applies("fused", 8193, _FUSED_CANDIDATES)  # torch.sort beyond
    assert _small_selection_block(512, 300) == 512  # never fewer slots than k


@pytest.mark.parametrize("collect", [False, True])
def test_default_kernel_streams_the_memory_through_a_software_pipeline(collect: bool) -> None:
    """The memory tiles arrive by asynchronous copies (loads of the next tiles overlap the
    current tile's product) in 16-byte vectors, and the product runs on Hopper's wgmma. A change
    that breaks the compiler's pipelining (e.g. an unaligned or data-dependent load) fails here
    rather than as a slower GPU search."""
    compiled = compile_kernel(KERNEL_CONFIGS[0], collect=collect, capability=90)
    ptx = compiled.asm["ptx"]  # type: ignore[attr-defined]
    copies = re.findall(r"cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], (\w+)", ptx)
    assert copies and set(copies) == {"0x10"}, copies  # 16-byte vectors only
    assert "wgmma.mma_async" in ptx
    # Without the valid mask (whose bytes load in pairs) the kernel loads no 2-byte scalars:
    # those would be memory rows read one bf16 at a time, the launcher's alignment lost.
    unmasked = compile_kernel(KERNEL_CONFIGS[0], collect=collect, capability=90, has_valid=False)
    assert "ld.global.b16" not in unmasked.asm["ptx"]  # type: ignore[attr-defined]


def _kernel_signature(collect: bool) -> str:
    compiled = compile_kernel(KERNEL_CONFIGS[0], collect=collect, capability=90)
    ttir: str = compiled.asm["ttir"]  # type: ignore[attr-defined]
    return next(line for line in ttir.splitlines() if "tt.func public" in line)


@pytest.mark.parametrize("collect", [False, True])
def test_tma_configs_load_tiles_with_hopper_bulk_copies(collect: bool) -> None:
    config = next(config for config in KERNEL_CONFIGS if config.loads == "tma")
    ptx = compile_kernel(config, collect=collect, capability=90).asm["ptx"]  # type: ignore[attr-defined]
    assert "cp.async.bulk.tensor" in ptx
    assert "wgmma.mma_async" in ptx


def test_compiled_kernel_is_specialised_like_the_launch() -> None:
    """Triton specialises a launch on its argument values (16-divisible pointers and ints; an int
    equal to 1 becomes a constant); compile_kernel must build that same kernel, or its resource
    figures describe a kernel that never runs (they did: scalar loads, no pipeline)."""
    collect, bound = _kernel_signature(collect=True), _kernel_signature(collect=False)
    assert "%memory_ptr: !tt.ptr<bf16> {tt.divisibility = 16" in collect
    assert "%stride_memory: i32 {tt.divisibility = 16" in collect  # 128-d rows
    assert "%num_rows: i32 loc" in collect  # 1,281,167 rows: not divisible by 16
    # The collect pass walks every tile (step 1, a constant); the bound pass every s-th.
    assert "%tile_step" not in collect
    assert "%tile_step: i32" in bound


@pytest.mark.parametrize(
    ("batch", "rows", "programs", "keep"),
    [
        (256, 1_281_167, 264, 4),  # ImageNet-1k on an H100: 4 query blocks × 264 programs
        (256, 14_197_122, 264, 4),  # ImageNet-21k
        (2048, 160_145, 33, 32),  # a sharded rank (8 ranks' queries over N/8 rows)
        (256, 300_000, 264, 4),
    ],
)
def test_bound_pass_keeps_about_four_k_tile_maxima_per_query(
    batch: int, rows: int, programs: int, keep: int
) -> None:
    """The bound pass writes each program's largest tile maxima, not every sampled tile's, so
    the selection of the bound sorts ~4k values per query whatever the memory size."""
    from look.search_triton import _search_plan

    plan = _search_plan(batch, rows, 201, KERNEL_CONFIGS[0], multiprocessors=132)
    assert (plan.bound_programs, plan.bound_keep) == (programs, keep)
    assert 4 * 201 <= plan.bound_columns <= min(8 * 201, plan.sampled_tiles)
    assert plan.has_bound


def test_bound_pass_of_a_small_memory_keeps_every_tile_maximum() -> None:
    from look.search_triton import _search_plan

    plan = _search_plan(256, 30_000, 201, KERNEL_CONFIGS[0], multiprocessors=132)
    # 938 tiles, stride 1 (fewer than 4k tiles): 264 programs of at most 4 tiles, all kept.
    assert plan.tile_stride == 1 and plan.bound_keep == 4
    assert plan.bound_programs * plan.bound_keep >= plan.sampled_tiles


@pytest.mark.parametrize(
    ("rows", "stride", "shift", "bound_excludes_repeats"),
    [
        (1_281_167, 4, True, False),  # the shifted last sampled tile repeats only skipped rows
        (30_000, 1, True, True),  # s = 1: it repeats rows of a tile the bound pass also reads
        (20, 1, False, False),  # fewer rows than a tile: loads keep their row-end masks
    ],
)
def test_the_last_tile_is_shifted_back_instead_of_masking_every_load(
    rows: int, stride: int, shift: bool, bound_excludes_repeats: bool
) -> None:
    """The kernel loads full tiles without row-end masks: a partial last tile is shifted back to
    end at the last row, and the rows it repeats are excluded where they could be counted twice
    (the collect pass always, on its rare append path; the bound pass only when it reads every
    tile)."""
    import torch

    from look.search_triton import _kernel_pass, _search_plan

    meta = torch.device("meta")
    queries = torch.empty(256, 128, dtype=torch.bfloat16, device=meta)
    memory = torch.empty(rows, 128, dtype=torch.bfloat16, device=meta)
    config = KERNEL_CONFIGS[0]
    plan = _search_plan(256, rows, 201, config, multiprocessors=132)
    assert plan.tile_stride == stride
    bound_pass = _kernel_pass(
        queries, memory, None, plan, config, tile_max=torch.empty(256, 8, device=meta)
    )
    collect_pass = _kernel_pass(
        queries, memory, None, plan, config,
        bound=torch.empty(256, device=meta), out_values=torch.empty(256, 8, device=meta),
        out_indices=torch.empty(256, 8, dtype=torch.int64, device=meta),
        counts=torch.empty(256, dtype=torch.int32, device=meta),
    )  # fmt: skip
    for kernel_pass, excludes in ((bound_pass, bound_excludes_repeats), (collect_pass, shift)):
        assert kernel_pass.constexprs["SHIFT_LAST_TILE"] is shift
        assert kernel_pass.constexprs["EXCLUDE_REPEATS"] is excludes
    assert bound_pass.constexprs["EVEN_D"] is True


def test_the_serialisation_note_is_read_from_ptxas_output() -> None:
    """ptxas serialised the collect pass's eight wgmma per tile (each waiting for the one before)
    while the row mask was a -inf bias that Triton folded into the accumulator's initial value;
    with a select after the product it does not (checked for every config above). This is its
    note for session 8's collect pass (sm_90a, -v)."""
    report = (
        "ptxas info    : (C7520) Potential Performance Loss: wgmma.mma_async instructions are "
        "serialized due to program dependence on compiler-inserted WG.AR in divergent path in "
        "the function '_knn_tiles_kernel'\nptxas info    : Used 96 registers, used 1 barriers"
    )
    reason = serialization_reason(report)
    assert reason == "program dependence on compiler-inserted WG.AR in divergent path"
    assert serialization_reason("ptxas info    : Used 42 registers, used 1 barriers") is None


@pytest.mark.parametrize("collect", [False, True])
@pytest.mark.parametrize("config_index", [0, 1, 29, 35])
def test_the_int8_prefilter_passes_run_int8_tensor_core_products(
    collect: bool, config_index: int
) -> None:
    """With an int8 copy of the memory (QuantizedRows) the collect pass, and the bound pass with
    ``int8_bound_pass``, stream 16-byte vectors of int8 rows through the software pipeline into
    Hopper's s8 wgmma (int32 accumulation), without spills or serialised wgmma, at 14.2M rows;
    Ampere compiles them too (int8 mma.sync). Otherwise the bound pass reads the bf16 rows."""
    config = KERNEL_CONFIGS[config_index]
    compiled = compile_kernel(
        config, collect=collect, capability=90, prefilter=True, rows=14_197_122
    )
    ptx = compiled.asm["ptx"]  # type: ignore[attr-defined]
    product = ptx.split("wgmma.mma_async", 1)[1].split("\n", 1)[0]
    if not (collect or config.int8_bound_pass):
        assert ".f32.bf16.bf16" in product, product
        return
    assert re.match(r"\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8", product), product
    copies = re.findall(r"cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], (\w+)", ptx)
    assert copies and set(copies) == {"0x10"}, copies
    resources = cubin_resources(compiled.asm["cubin"])  # type: ignore[attr-defined]
    assert resources.get("stack", 0) == 0 and resources.get("local", 0) == 0, resources
    assert wgmma_serialization(compiled) is None
    # Its query operands come from shared memory, or with "registers" (int16 parts narrowed in
    # the kernel) from registers: "{%r..}" in place of a shared-memory descriptor.
    operand_a = product.split("}", 1)[1]
    in_registers = operand_a.lstrip(", ").startswith("{")
    assert in_registers == (config.query_operand == "registers"), operand_a
    if config_index == 0:
        ampere = compile_kernel(config, collect=collect, capability=80, prefilter=True)
        assert "mma.sync.aligned" in ampere.asm["ptx"]  # type: ignore[attr-defined]
        assert ".s8.s8" in ampere.asm["ptx"]  # type: ignore[attr-defined]


def test_the_int8_prefilter_doubles_the_candidate_room() -> None:
    from look.search_triton import _FUSED_CANDIDATES, _fused_select_applies, _search_plan

    stride_8 = next(config for config in KERNEL_CONFIGS if config.tile_stride == 8)
    for rows in (1_281_167, 14_197_122):
        exact = _search_plan(256, rows, 201, KERNEL_CONFIGS[0], multiprocessors=132)
        int8 = _search_plan(256, rows, 201, KERNEL_CONFIGS[0], multiprocessors=132, prefilter=True)
        assert int8.capacity == 2 * exact.capacity == 6432
        assert int8.total_tiles == exact.total_tiles and int8.tile_stride == exact.tile_stride
        # s = 8: capped where the candidates' fused sort still holds the buffer.
        wide = _search_plan(256, rows, 201, stride_8, multiprocessors=132, prefilter=True)
        assert wide.capacity == _FUSED_CANDIDATES == 8192
        assert _fused_select_applies("fused", wide.capacity, _FUSED_CANDIDATES)


@pytest.mark.parametrize("capability", [90, 80])
def test_the_int8_prefilters_helper_kernels_compile_without_spilling(capability: int) -> None:
    """The exact re-scoring of the candidates (a loop over a query's filled slots, gathering 64
    bf16 rows at a time) as a 14.2M-row search launches it, and the copy's write of a batch."""
    for compiled in compile_prefilter_kernels(capability):
        resources = cubin_resources(compiled.asm["cubin"])  # type: ignore[attr-defined]
        assert resources.get("stack", 0) == 0 and resources.get("local", 0) == 0, resources
