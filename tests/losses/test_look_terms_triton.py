"""The fused LOOK loss terms: their kernels in Triton's interpreter (CPU), their build for
Ampere and Hopper (no GPU needed), and where they are used."""

from __future__ import annotations

import os

import pytest
import torch

import look.losses.look_terms_triton as terms_module
from look.losses.look_terms_triton import (
    compile_terms_kernels,
    fused_terms_enabled,
    fused_terms_supported,
)
from look.search_triton import cubin_resources, triton_available
from tests.interpreter_cases import run_case_module

needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")


@needs_triton
def test_fused_terms_match_the_definition_in_triton_interpreter() -> None:
    output = run_case_module("tests.look_terms_triton_cases")
    assert output.count(": ok") == 11, output


@needs_triton
@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize(("dim", "memory_dtype"), [(128, "bf16"), (20, "fp16"), (768, "fp32")])
def test_the_kernels_compile_for_ampere_and_hopper(
    capability: int, dim: int, memory_dtype: str
) -> None:
    forward, backward = compile_terms_kernels(capability, dim=dim, memory_dtype=memory_dtype)
    for kernel in (forward, backward):
        resources = cubin_resources(kernel.asm["cubin"])  # type: ignore[attr-defined]
        # One program per query keeps BLOCK_K × d fp32 values in registers: no spill to local
        # memory (a spill would turn the gather into a round trip through DRAM).
        assert resources["stack"] == 0 and resources.get("local", 0) == 0, resources
        assert 0 < resources["reg"] <= 255


def test_a_cpu_memory_keeps_the_pytorch_terms() -> None:
    queries, memory = torch.randn(4, 8), torch.randn(50, 8)
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not fused_terms_supported(queries, memory)
    assert not fused_terms_supported(queries.double(), memory)  # fp64 stays in PyTorch
    assert not fused_terms_supported(torch.randn(4, 2048), torch.randn(50, 2048))  # too wide


def test_the_switch_turns_the_fused_terms_off_and_back() -> None:
    with fused_terms_enabled(True):
        with fused_terms_enabled(False):
            assert not fused_terms_supported(torch.randn(4, 8), torch.randn(50, 8))
            assert not terms_module._enabled
        assert terms_module._enabled  # the setting before the block, restored
    with pytest.raises(RuntimeError), fused_terms_enabled(False):
        raise RuntimeError("a failing block")
    assert terms_module._enabled  # restored after an error too
