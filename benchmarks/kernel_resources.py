"""Registers, spills, shared memory and wgmma serialisation of the fused kernels, without a GPU.

    python benchmarks/kernel_resources.py --output kernel_resources.json [--capability 90]

Each config of ``look.search_triton.KERNEL_CONFIGS`` is compiled (bound pass and collect pass, bf16
memory of 128-d rows, with a valid mask) for the given CUDA compute capability by Triton and its
bundled ``ptxas``; ``cuobjdump --dump-resource-usage`` reads the registers per thread and the stack
(spill) bytes from the binary, and for Hopper ``ptxas -v`` says whether it serialises the
``wgmma`` instructions (each waits for the one before) and why. No speed is measured: this says
which configs spill, fit fewer thread blocks per SM or serialise their matrix product, to read
next to the GPU tuning of ``benchmarks/gpu_step.py --tune``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import triton

from look.losses.look_terms_triton import compile_terms_kernels
from look.search_triton import (
    KERNEL_CONFIGS,
    compile_kernel,
    cubin_resources,
    wgmma_serialization,
)

# Per-SM limits: registers, shared memory (bytes), resident blocks and threads.
_SM_LIMITS = {
    75: (65536, 64 * 1024, 16, 1024),
    80: (65536, 164 * 1024, 32, 2048),
    90: (65536, 228 * 1024, 32, 2048),
    100: (65536, 228 * 1024, 32, 2048),
}


def blocks_per_sm(registers: int, shared: int, num_warps: int, capability: int) -> int | None:
    """Resident thread blocks per SM by registers (allocated per warp in units of 256), shared
    memory (1 KB reserved per block from Ampere on) and the block and thread caps."""
    if capability not in _SM_LIMITS:
        return None
    register_file, shared_per_sm, max_blocks, max_threads = _SM_LIMITS[capability]
    registers_per_warp = -(-registers * 32 // 256) * 256
    by_registers = register_file // (registers_per_warp * num_warps)
    reserved = 1024 if capability >= 80 else 0
    by_shared = shared_per_sm // (shared + reserved) if shared else max_blocks
    return min(by_registers, by_shared, max_blocks, max_threads // (32 * num_warps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--capability", type=int, default=90, help="e.g. 90 (H100), 80 (A100)")
    args = parser.parse_args()
    rows = []
    for config in KERNEL_CONFIGS:
        for collect in (False, True):
            compiled = compile_kernel(config, collect=collect, capability=args.capability)
            resources = cubin_resources(compiled.asm["cubin"])  # type: ignore[attr-defined]
            resources["dynamic_shared"] = int(compiled.metadata.shared)  # type: ignore[attr-defined]
            resources["blocks_per_sm"] = blocks_per_sm(
                resources.get("reg", 0), resources["dynamic_shared"], config.num_warps,
                args.capability,
            )  # fmt: skip
            # Hopper only: ptxas's reason for making each wgmma wait for the one before, if any.
            resources["wgmma_serialized"] = (
                wgmma_serialization(compiled, args.capability) if args.capability == 90 else None
            )
            rows.append({**asdict(config), "pass": "collect" if collect else "bound", **resources})
            print(
                f"{config.block_q:>3}x{config.block_n:<3} w{config.num_warps} s{config.num_stages} "
                f"{config.collect:<6} {config.loads:<7} skip={config.skip_empty_tiles!s:<5} "
                f"stride={config.tile_stride:<2} "
                f"{rows[-1]['pass']:<7} registers {resources.get('reg')}, spill stack "
                f"{resources.get('stack')} B, shared {resources['dynamic_shared']} B, "
                f"{resources['blocks_per_sm']} blocks per SM"
                + (", wgmma serialized" if resources["wgmma_serialized"] else "")
            )
    # The fused loss terms (one program per query, 256 queries × k = 200 of 128-d bf16 rows).
    terms = []
    for name, compiled in zip(
        ("forward", "backward"), compile_terms_kernels(args.capability), strict=True
    ):
        resources = cubin_resources(compiled.asm["cubin"])  # type: ignore[attr-defined]
        terms.append({"kernel": f"terms_{name}", **resources})
        print(f"loss terms, {name}: registers {resources.get('reg')}, spill stack "
              f"{resources.get('stack')} B")  # fmt: skip
    report = {
        "triton": triton.__version__, "capability": args.capability, "kernels": rows,
        "loss_terms_kernels": terms,
    }  # fmt: skip
    Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
