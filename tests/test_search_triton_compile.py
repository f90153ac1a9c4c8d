"""Every kernel configuration the tuner may pick compiles for Hopper (sm_90) and Ampere (sm_80),
without a GPU: Triton lowers the kernel to PTX and its bundled ptxas assembles it.

Triton's CPU interpreter (tests/test_search_triton.py) checks what the kernel computes, not whether
the compiler accepts it; a kernel the compiler rejects would only show on a GPU (the search then
falls back to the slow scan). The collect pass's per-candidate atomic, for one, first hit an
assertion in Triton 3.8's layout pass."""

from __future__ import annotations

import pytest

from look.search_triton import KERNEL_CONFIGS, SearchKernelConfig, compile_kernel, triton_available

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
            )  # fmt: skip
            if collect:
                key += (config.collect, config.skip_empty_tiles)
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
    shared = _shared_memory(config, collect=collect, capability=90)
    if config == KERNEL_CONFIGS[0]:  # the default must also fit; the tuner skips others that don't
        assert shared <= _SHARED_MEMORY_LIMIT[90]


@pytest.mark.parametrize("collect", [False, True])
@pytest.mark.parametrize(
    ("capability", "dtype"),
    [(80, "bf16"), (75, "fp16"), (100, "bf16")],  # fp16 only before Ampere (no bf16 MMA)
)
def test_default_config_compiles_for_other_gpus(capability: int, dtype: str, collect: bool) -> None:
    shared = _shared_memory(KERNEL_CONFIGS[0], collect=collect, capability=capability, dtype=dtype)
    assert shared <= _SHARED_MEMORY_LIMIT[capability]
