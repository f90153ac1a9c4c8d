"""Registers, spills and shared memory of every fused-search kernel config, compiled without a GPU.

    python benchmarks/kernel_resources.py --output kernel_resources.json [--capability 90]

Each config of ``look.search_triton.KERNEL_CONFIGS`` is compiled (bound pass and collect pass, bf16
memory of 128-d rows, with a valid mask) for the given CUDA compute capability by Triton and its
bundled ``ptxas``; ``cuobjdump --dump-resource-usage`` reads the registers per thread and the stack
(spill) bytes from the binary. No speed is measured: this says which configs spill or fit fewer
thread blocks per SM, to read next to the GPU tuning of ``benchmarks/gpu_step.py --tune``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from dataclasses import asdict
from pathlib import Path

import triton

from look.search_triton import KERNEL_CONFIGS, compile_kernel

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _resources(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run(
            [str(CUOBJDUMP), "--dump-resource-usage", file.name],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", report))
    return {name.lower(): int(value) for name, value in fields.items()}


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
            resources = _resources(compiled.asm["cubin"])  # type: ignore[attr-defined]
            resources["dynamic_shared"] = int(compiled.metadata.shared)  # type: ignore[attr-defined]
            resources["blocks_per_sm"] = blocks_per_sm(
                resources.get("reg", 0), resources["dynamic_shared"], config.num_warps,
                args.capability,
            )  # fmt: skip
            rows.append({**asdict(config), "pass": "collect" if collect else "bound", **resources})
            print(
                f"{config.block_q:>3}x{config.block_n:<3} w{config.num_warps} s{config.num_stages} "
                f"{config.collect:<6} {config.loads:<7} skip={config.skip_empty_tiles!s:<5} "
                f"stride={config.tile_stride:<2} "
                f"{rows[-1]['pass']:<7} registers {resources.get('reg')}, spill stack "
                f"{resources.get('stack')} B, shared {resources['dynamic_shared']} B, "
                f"{resources['blocks_per_sm']} blocks per SM"
            )
    report = {"triton": triton.__version__, "capability": args.capability, "kernels": rows}
    Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
