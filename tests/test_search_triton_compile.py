"""Every kernel configuration the tuner may pick compiles for Hopper (sm_90) and Ampere (sm_80),
without a GPU: Triton lowers the kernel to PTX and its bundled ptxas assembles it.

Triton's CPU interpreter (tests/test_search_triton.py) checks what the kernel computes, not whether
the compiler accepts it; a kernel the compiler rejects would only show on a GPU (the search then
falls back to the slow scan). The collect pass's per-candidate atomic, for one, first hit an
assertion in Triton 3.8's layout pass."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from look.search_triton import KERNEL_CONFIGS, SearchKernelConfig, _knn_tiles_kernel  # noqa: E402

# H100/A100 dynamic shared memory per block.
_SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def _compile(config: SearchKernelConfig, *, collect: bool, capability: int) -> int:
    """Compile one pass of the kernel for a bf16 memory of 128-d rows; returns its shared memory."""
    pointers = {
        "query_ptr": "*bf16", "memory_ptr": "*bf16", "valid_ptr": "*u8", "bound_ptr": "*fp32",
        "tile_max_ptr": "*fp32", "out_values_ptr": "*fp32", "out_indices_ptr": "*i64",
        "counts_ptr": "*i32",
    }  # fmt: skip
    scalars = (
        "num_queries", "num_rows", "dim", "stride_query", "stride_memory", "num_tiles",
        "tile_step", "capacity",
    )  # fmt: skip
    constexprs = {
        "HAS_VALID": True,
        "COLLECT": collect,
        "ATOMIC_PER_CANDIDATE": config.collect == "atomic",
        "SKIP_EMPTY_TILES": config.skip_empty_tiles,
        "BLOCK_Q": config.block_q,
        "BLOCK_N": config.block_n,
        "BLOCK_D": 128,
    }
    signature = {
        **pointers,
        **dict.fromkeys(scalars, "i32"),
        **dict.fromkeys(constexprs, "constexpr"),
    }
    source = ASTSource(fn=_knn_tiles_kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    assert compiled.asm["cubin"], "ptxas produced no binary"
    return int(compiled.metadata.shared)


def _unique_passes() -> list[tuple[SearchKernelConfig, bool]]:
    """Each distinct compiled kernel once (the bound pass ignores the collect settings)."""
    seen: set[tuple[object, ...]] = set()
    passes = []
    for config in KERNEL_CONFIGS:
        for collect in (False, True):
            key = (config.block_q, config.block_n, config.num_warps, config.num_stages, collect)
            if collect:
                key += (config.collect, config.skip_empty_tiles)
            if key not in seen:
                seen.add(key)
                passes.append((config, collect))
    return passes


@pytest.mark.parametrize(
    ("config", "collect"),
    _unique_passes(),
    ids=lambda value: str(value) if isinstance(value, bool) else "-",
)
def test_every_tuner_config_compiles_for_hopper(config: SearchKernelConfig, collect: bool) -> None:
    shared = _compile(config, collect=collect, capability=90)
    if config == KERNEL_CONFIGS[0]:  # the default must also fit; the tuner skips others that don't
        assert shared <= _SHARED_MEMORY_LIMIT[90]


@pytest.mark.parametrize("collect", [False, True])
def test_default_config_compiles_for_ampere(collect: bool) -> None:
    assert _compile(KERNEL_CONFIGS[0], collect=collect, capability=80) <= _SHARED_MEMORY_LIMIT[80]
