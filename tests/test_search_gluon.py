"""The Gluon passes (look.search_gluon) without a GPU: they compile for Hopper with their register
split and no spills, their warpgroups synchronise only among themselves, their grid follows the
batch, and the search's dispatch leaves the passes to Triton wherever Gluon does not apply or
fails. What they compute is checked on a Hopper GPU (tests/test_search_gluon_cuda.py): Triton's
interpreter does not run Gluon kernels."""

from __future__ import annotations

import dataclasses
import re
import warnings

import pytest
import torch

from look import search_gluon
from look.search_gluon import (
    _register_split,
    gluon_available,
    gluon_bound_columns,
    gluon_bound_pass,
    gluon_collect_pass,
)
from look.search_triton import (
    KERNEL_CONFIGS,
    TUNED_CONFIGS,
    SearchKernelConfig,
    _cdiv,
    compile_kernel,
    cubin_resources,
    cuobjdump,
    ptxas_report,
)
from tests.gluon_reference import reference_gluon_pass

pytestmark = pytest.mark.skipif(not gluon_available(), reason="Triton's Gluon is not installed")

GLUON_CONFIGS = [config for config in KERNEL_CONFIGS if config.kernel == "gluon"]


def test_the_gluon_configs_are_tuned_only_on_request() -> None:
    assert len(GLUON_CONFIGS) == 5
    assert all(config.kernel == "triton" for config in TUNED_CONFIGS)
    assert len(TUNED_CONFIGS) + len(GLUON_CONFIGS) == len(KERNEL_CONFIGS)


@pytest.mark.parametrize("groups", [2, 4])
def test_the_register_split_fits_one_block_per_sm(groups: int) -> None:
    launch, consumer = _register_split(groups)
    warpgroups = groups + 1  # the producer's warp takes a warpgroup's registers
    assert launch % 8 == 0 and consumer % 8 == 0 and launch <= 255
    assert launch * warpgroups * 128 <= 65536  # the launch itself must fit the SM
    # After the split: the producer's 24, the worker consumers' share, and the default
    # consumer's rest (at least a worker's) fit the registers the block was given.
    default = launch * warpgroups - 24 - consumer * (groups - 1)
    assert default >= consumer >= launch


def _meta_pass(batch: int, rows: int, *, groups: int = 4, block_n: int = 32, valid: bool = False):
    meta = torch.device("meta")
    bound = torch.empty(batch, 4096, device=meta)[:, 200]  # a column of the sorted maxima
    return gluon_collect_pass(
        torch.empty(batch, 128, dtype=torch.bfloat16, device=meta),
        torch.empty(rows, 128, dtype=torch.bfloat16, device=meta),
        torch.empty(rows, dtype=torch.uint8, device=meta) if valid else None,
        bound,
        torch.empty(batch, 3216, device=meta),
        torch.empty(batch, 3216, dtype=torch.int64, device=meta),
        torch.empty(batch, dtype=torch.int32, device=meta),
        block_n=block_n, stages=4, groups=groups, widen_bound=True, multiprocessors=132,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("batch", "requested", "groups", "grid"),
    [
        (256, 4, 4, (1, 132)),  # one block per SM, each reading its tiles once for all 256 queries
        (300, 4, 4, (2, 66)),  # two query blocks share the SMs (and each tile's L2 lines)
        (100, 4, 2, (1, 132)),  # 100 queries fill two warpgroups: no idle third and fourth
        (20, 4, 2, (1, 132)),  # (the second idles: one group is not compiled)
        (256, 2, 2, (2, 66)),
    ],
)
def test_the_grid_follows_the_batch(
    batch: int, requested: int, groups: int, grid: tuple[int, int]
) -> None:
    gluon_pass = _meta_pass(batch, 1_281_167, groups=requested)
    assert gluon_pass.grid == grid
    assert gluon_pass.constexprs["GROUPS"] == groups
    assert gluon_pass.maxnreg == _register_split(groups)[0]
    assert _meta_pass(batch, 1000, groups=requested).grid[1] == 32  # no more programs than tiles
    # The bound pass's output: block_n bins per program (4,224 for 256 queries on 132 SMs).
    columns = gluon_bound_columns(batch, 10_000, block_n=32, groups=requested, multiprocessors=132)
    assert columns == grid[1] * 32


def test_query_groups_other_than_two_or_four_are_refused() -> None:
    with pytest.raises(ValueError, match="query groups must be 2 or 4"):
        _meta_pass(256, 1000, groups=3)


@pytest.mark.parametrize(
    ("config", "collect", "has_valid"),
    [(config, collect, True) for config in GLUON_CONFIGS for collect in (False, True)]
    + [(GLUON_CONFIGS[0], True, False)]  # a full bank: no valid mask
    # tiles in pairs over a ring of an odd size (its CUDA test: tests/test_search_gluon_cuda.py)
    + [(dataclasses.replace(KERNEL_CONFIGS[40], num_stages=7), True, True)],
    ids=lambda value: str(value) if isinstance(value, bool) else "-",
)
def test_the_gluon_passes_compile_for_hopper_without_spilling(
    config: SearchKernelConfig, collect: bool, has_valid: bool
) -> None:
    compiled = compile_kernel(
        config, collect=collect, capability=90, has_valid=has_valid, rows=14_197_122
    )
    resources = cubin_resources(compiled.asm["cubin"])  # type: ignore[attr-defined]
    assert resources.get("stack", 0) == 0 and resources.get("local", 0) == 0, resources
    ptx: str = compiled.asm["ptx"]  # type: ignore[attr-defined]
    launch, consumer = _register_split(config.gluon_groups)
    assert resources["reg"] == launch
    # The producer drops to 24 registers per thread, the worker consumers take their share.
    allocations = {int(n) for n in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx)}
    assert {24, consumer} <= allocations
    assert "cp.async.bulk.tensor" in ptx  # tiles arrive by bulk (TMA) copies
    assert "mbarrier.try_wait" in ptx and "mbarrier.arrive" in ptx
    # Every barrier inside a partition names its own warpgroup (128 threads): no consumer
    # waits for another (only the entry and exit of the specialised region sync the block).
    counted = re.findall(r"\bbar\.sync\s+\d+,\s*(\d+);", ptx)
    assert counted and set(counted) == {"128"}, counted
    sass = cuobjdump(compiled.asm["cubin"], "-sass")  # type: ignore[attr-defined]
    shape = f"HGMMA.64x{config.block_n}x16.F32.BF16"
    # The queries stay in registers: wgmma's A operand is a register, not a shared descriptor.
    products = [line for line in sass.splitlines() if shape in line]
    assert products and all(re.search(r"HGMMA\.\S+ R\d+, R\d+, gdesc", line) for line in products)
    assert ("ATOMG" in sass) == collect  # only the collect pass appends
    # ptxas honours the register split (no C7508: setmaxnreg ignored) and keeps the wgmma
    # instructions in flight together (no C7520); no other warning either.
    report = ptxas_report(compiled)
    assert "warning" not in report.lower() and "C75" not in report, report


def test_configs_with_tile_pairs_compile_two_products_per_turn() -> None:
    """Configs 40 and 41 are config 36 with its collect pass's tiles in pairs (41: its buffers
    freed a pair at a time): the search's compile path hands the flags to the kernel (two
    products per turn of each consumer's loop, so twice the wgmma instructions; 41 half the
    `empty` barriers, so half their initialisations), and the bound pass is config 36's."""
    single, paired, released = KERNEL_CONFIGS[36], KERNEL_CONFIGS[40], KERNEL_CONFIGS[41]
    assert paired == dataclasses.replace(single, gluon_tile_pairs=True)
    assert released == dataclasses.replace(paired, gluon_pair_release=True)

    def ptx_and_sass(config: SearchKernelConfig, collect: bool) -> tuple[str, str]:
        compiled = compile_kernel(config, collect=collect, capability=90, has_valid=False)
        sass = cuobjdump(compiled.asm["cubin"], "-sass")  # type: ignore[attr-defined]
        return compiled.asm["ptx"], sass  # type: ignore[attr-defined]

    def products(config: SearchKernelConfig, collect: bool) -> int:
        return ptx_and_sass(config, collect)[1].count(f"HGMMA.64x{config.block_n}x16.F32.BF16")

    def barrier_inits(config: SearchKernelConfig) -> int:
        return len(re.findall(r"mbarrier\.init\S*\s", ptx_and_sass(config, True)[0]))

    for config in (paired, released):
        assert products(config, True) == 2 * products(single, True)
        assert products(config, False) == products(single, False)
    # ready and empty, one each per buffer; with pair releases, one empty per two buffers.
    stages = single.num_stages
    assert barrier_inits(single) == barrier_inits(paired) == 2 * stages
    assert barrier_inits(released) == stages + stages // 2


def test_pair_releases_need_tile_pairs_and_an_even_ring() -> None:
    meta = torch.device("meta")
    for pairs, stages in ((False, 8), (True, 7)):
        with pytest.raises(ValueError, match="pair_release frees the ring's buffers a pair"):
            gluon_collect_pass(
                torch.empty(256, 128, dtype=torch.bfloat16, device=meta),
                torch.empty(1000, 128, dtype=torch.bfloat16, device=meta), None,
                torch.empty(256, device=meta), torch.empty(256, 64, device=meta),
                torch.empty(256, 64, dtype=torch.int64, device=meta),
                torch.empty(256, dtype=torch.int32, device=meta), block_n=32, stages=stages,
                groups=4, widen_bound=True, multiprocessors=132, tile_pairs=pairs,
                pair_release=True,
            )  # fmt: skip
        # The same rule when the config is made, before any search.
        with pytest.raises(ValueError, match="pair_release frees the ring's buffers a pair"):
            SearchKernelConfig(
                64, 32, 4, stages, "fused", "atomic", kernel="gluon", gluon_tile_pairs=pairs,
                gluon_pair_release=True,
            )  # fmt: skip
    with pytest.raises(ValueError, match="apply to kernel='gluon'"):
        SearchKernelConfig(64, 32, 4, 8, "fused", "atomic", gluon_tile_pairs=True)


def test_the_search_leaves_the_passes_to_triton_where_gluon_does_not_apply() -> None:
    from look.search_triton import _gluon_applies

    queries, memory = torch.randn(8, 16).half(), torch.randn(100, 16).half()
    config = GLUON_CONFIGS[0]
    assert not _gluon_applies(config, queries, memory, None, None)  # the interpreter
    assert not _gluon_applies(config, queries, memory, None, 132)  # a CPU memory
    assert not _gluon_applies(KERNEL_CONFIGS[0], queries, memory, None, 132)  # Triton asked


def test_a_failing_gluon_pass_warns_once_and_leaves_its_work_to_triton(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import look.search_triton as search_triton

    class Broken:
        def launch(self) -> None:
            raise RuntimeError("no Gluon for this Triton")

    monkeypatch.setattr(search_triton._GLUON_FALLBACK, "failed", False)
    monkeypatch.setattr(search_gluon, "gluon_applies", lambda *a: True)
    queries, memory = torch.randn(8, 16).half(), torch.randn(100, 16).half()
    assert search_triton._gluon_applies(GLUON_CONFIGS[0], queries, memory, None, 132)
    with pytest.warns(RuntimeWarning, match="Gluon passes.*no Gluon for this Triton"):
        assert not search_triton._launch_gluon(Broken)
    # From then on the Triton passes run: no Gluon, no retry, no second warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not search_triton._gluon_applies(GLUON_CONFIGS[0], queries, memory, None, 132)


def test_the_reference_bins_are_each_positions_largest_product_over_a_programs_tiles() -> None:
    """tests/gluon_reference.py, which stands in for the bound pass on CPU and judges it on a
    GPU, against a plain loop: program p reads sampled tiles p, p + P, … (every
    ``tile_step``-th tile of the memory); bin j of p holds the largest product at position j
    of those tiles, over rows inside the memory and valid."""
    generator = torch.Generator().manual_seed(0)
    batch, rows, dim, block_n, tile_step = 5, 16 * 60 + 7, 16, 16, 3  # last sampled tile: 7 rows
    queries = torch.randn(batch, dim, generator=generator).half()
    memory = torch.randn(rows, dim, generator=generator).half()
    valid = torch.rand(rows, generator=generator) > 0.3
    sampled = _cdiv(_cdiv(rows, block_n), tile_step)
    columns = gluon_bound_columns(batch, sampled, block_n=block_n, groups=4, multiprocessors=4)
    tile_max = torch.full((batch, columns), float("nan"))
    gluon_pass = gluon_bound_pass(
        queries, memory, valid.view(torch.uint8), tile_max, sampled_tiles=sampled,
        tile_step=tile_step, block_n=block_n, stages=4, groups=4, multiprocessors=4,
    )  # fmt: skip
    reference_gluon_pass(gluon_pass)
    programs = gluon_pass.grid[1]
    assert programs == 4 and columns == programs * block_n
    expected = torch.full((batch, columns), float("-inf"))
    for query in range(batch):
        for program in range(programs):
            for tile in range(program, sampled, programs):
                for position in range(block_n):
                    row = tile * tile_step * block_n + position
                    if row < rows and valid[row]:
                        product = float(queries[query].double() @ memory[row].double())
                        column = program * block_n + position
                        expected[query, column] = max(float(expected[query, column]), product)
    torch.testing.assert_close(tile_max, expected, rtol=0, atol=1e-5)


def test_the_reference_collect_pass_appends_every_valid_row_at_or_above_the_widened_bound() -> None:
    generator = torch.Generator().manual_seed(1)
    batch, rows, dim, capacity = 4, 500, 8, 60
    queries = torch.randn(batch, dim, generator=generator).half()
    memory = torch.randn(rows, dim, generator=generator).half()
    valid = torch.rand(rows, generator=generator) > 0.2
    products = queries.double() @ memory.double().T
    # A bound per query, held in a column of a wider tensor (the search passes such a view);
    # query 2's makes it overflow, query 3 has none (-inf: every valid row).
    sorted_products = products.sort(dim=1, descending=True).values
    bounds = torch.zeros(batch, 3)
    bounds[:, 1] = sorted_products[:, 20].float()
    bounds[2, 1] = sorted_products[2, 100]
    bounds[3, 1] = float("-inf")
    counts = torch.zeros(batch, dtype=torch.int32)
    out_values = torch.full((batch, capacity), float("nan"))
    out_indices = torch.full((batch, capacity), -1, dtype=torch.int64)
    gluon_pass = gluon_collect_pass(
        queries, memory, valid.view(torch.uint8), bounds[:, 1], out_values, out_indices, counts,
        block_n=16, stages=4, groups=4, widen_bound=True, multiprocessors=4,
    )  # fmt: skip
    reference_gluon_pass(gluon_pass)
    for query in range(batch):
        bound = float(bounds[query, 1])
        widened = bound - abs(bound) * 2.0**-20 if bound > float("-inf") else -3.4e38
        expected = [row for row in range(rows) if valid[row] and products[query, row] >= widened]
        assert int(counts[query]) == len(expected)
        stored = min(len(expected), capacity)
        assert out_indices[query, :stored].tolist() == expected[:stored]
        torch.testing.assert_close(
            out_values[query, :stored].double(), products[query, expected[:stored]], atol=1e-5,
            rtol=0,
        )  # fmt: skip
    assert int(counts[2]) > capacity and int(counts[3]) == int(valid.sum())
