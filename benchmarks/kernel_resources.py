"""Registers, spills, shared memory and wgmma serialisation of the fused kernels, without a GPU.

    python benchmarks/kernel_resources.py --output kernel_resources.json [--capability 90] \
        [--configs 0 1] [--no-valid] [--prefilter int8]

Each config of ``look.search_triton.KERNEL_CONFIGS`` is compiled (bound pass and collect pass, bf16
memory of 128-d rows, with a valid mask, or with ``--no-valid`` without one as a memory known to be
full is searched; with ``--prefilter int8`` reading the memory's int8 copy instead) for the
given CUDA compute capability by Triton and its
bundled ``ptxas``; ``cuobjdump --dump-resource-usage`` reads the registers per thread and the stack
(spill) bytes from the binary, and for Hopper ``ptxas -v`` says whether it serialises the
``wgmma`` instructions (each waits for the one before) and why. From the SASS (``cuobjdump
-sass``) it counts the instructions of one iteration of the tile loop on its common path (a tile
without candidates) and reports them per similarity of the tile, counted in warp instructions:
a static proxy for issue slots, next to the tensor cores' share; and the barriers (``BAR.SYNC``)
a thread waits at per tile on a loop's common path, the most of any loop (a Gluon pass has one
loop per consumer warpgroup). No speed is measured: this says
which configs spill, fit fewer thread blocks per SM, serialise their matrix product or spend more
instructions per similarity, to read next to the GPU tuning of ``benchmarks/gpu_step.py
--tune``.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict
from pathlib import Path

import triton

from look.losses.look_terms_triton import compile_terms_kernels
from look.search_triton import (
    KERNEL_CONFIGS,
    compile_kernel,
    compile_selection_kernels,
    cubin_resources,
    cuobjdump,
    wgmma_serialization,
)

# Per-SM limits: registers, shared memory (bytes), resident blocks and threads.
_SM_LIMITS = {
    75: (65536, 64 * 1024, 16, 1024),
    80: (65536, 164 * 1024, 32, 2048),
    90: (65536, 228 * 1024, 32, 2048),
    100: (65536, 228 * 1024, 32, 2048),
}


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH_TARGET = re.compile(r"\bBRA\s+(?:\S+\s+)?0x([0-9a-f]+)")


def sass_instructions(cubin: bytes) -> list[tuple[int, str]]:
    """``(address, instruction)`` of the SASS in ``cubin`` (``cuobjdump -sass``)."""
    listing = cuobjdump(cubin, "-sass")
    return [(int(address, 16), text.strip()) for address, text in _INSTRUCTION.findall(listing)]


def loop_paths(instructions: list[tuple[int, str]]) -> list[list[str]]:
    """The instructions one iteration of each tile loop issues (per thread), on its common
    path, longest loop first: a loop is a (predicated) backward branch around
    matrix-product instructions (``HGMMA``/``HMMA``, or ``IGMMA``/``IMMA`` for the int8
    copy's; a Gluon pass has one per consumer warpgroup); a forward branch that lands inside
    the loop is taken (it skips the append of a tile without candidates) unless it skips a
    matrix product, one that leaves it is not (a slow path, e.g. waiting for a TMA barrier)."""
    products = [
        address for address, text in instructions
        if any(name in text for name in ("HGMMA", "HMMA", "IGMMA", "IMMA"))
    ]  # fmt: skip
    branches = []
    for address, text in instructions:
        target = _BRANCH_TARGET.search(text)
        if target:
            branches.append((address, int(target.group(1), 16)))
    # A loop's latch is a predicated backward branch; an unconditional one returns from an
    # out-of-line wait (e.g. a TMA barrier's retry) and spans code that is not the loop.
    latches = {address for address, text in instructions if text.startswith("@")}
    loops = [
        (target, address)
        for address, target in branches
        if target < address
        and address in latches
        and any(target <= product <= address for product in products)
    ]
    paths = []
    for start, end in sorted(loops, key=lambda loop: loop[0] - loop[1]):
        skipped: set[int] = set()
        for address, target in branches:
            # (a branch over a matrix product is not taken: it guards a pair's second tile,
            # which every turn but an odd count's last runs)
            if start <= address < target <= end and not any(
                address < product < target for product in products
            ):
                skipped.update(a for a, _ in instructions if address < a < target)
        paths.append([
            text for address, text in instructions
            if start <= address <= end and address not in skipped
        ])  # fmt: skip
    return paths


def main_loop_path(instructions: list[tuple[int, str]]) -> list[str] | None:
    """The common path of the longest tile loop (:func:`loop_paths`); None if there is none."""
    paths = loop_paths(instructions)
    return paths[0] if paths else None


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
    parser.add_argument(
        "--configs", type=int, nargs="+", default=None,
        help="positions in look.search_triton.KERNEL_CONFIGS (default: every config)",
    )  # fmt: skip
    parser.add_argument(
        "--no-valid", action="store_true",
        help="compile the search without a valid mask, as a memory known to be full searches",
    )  # fmt: skip
    parser.add_argument(
        "--prefilter", choices=["none", "int8"], default="none",
        help="compile the passes that read the memory's int8 copy (QuantizedRows)",
    )  # fmt: skip
    args = parser.parse_args()
    rows = []
    configs = KERNEL_CONFIGS if args.configs is None else [KERNEL_CONFIGS[i] for i in args.configs]
    for config in configs:
        for collect in (False, True):
            compiled = compile_kernel(
                config, collect=collect, capability=args.capability, has_valid=not args.no_valid,
                prefilter=args.prefilter == "int8",
            )  # fmt: skip
            resources = cubin_resources(compiled.asm["cubin"])  # type: ignore[attr-defined]
            resources["dynamic_shared"] = int(compiled.metadata.shared)  # type: ignore[attr-defined]
            # A Gluon pass runs its consumer warpgroups and the producer's (registers are
            # allocated per warpgroup) in one block.
            gluon = config.kernel == "gluon" and args.prefilter == "none" and args.capability // 10 == 9
            warps = 4 * (config.gluon_groups + 1) if gluon else config.num_warps
            resources["blocks_per_sm"] = blocks_per_sm(
                resources.get("reg", 0), resources["dynamic_shared"], warps, args.capability
            )
            # Issue slots per similarity: the loop's instructions per thread, times the warps,
            # over the similarities of a tile (a static proxy; no speed is measured). For a
            # Gluon pass: one consumer's loop (4 warps, 64 queries).
            paths = loop_paths(sass_instructions(compiled.asm["cubin"]))  # type: ignore[attr-defined]
            loop = len(paths[0]) if paths else None
            resources["loop_instructions"] = loop
            block_warps, block_q = (4, 64) if gluon else (config.num_warps, min(config.block_q, 256))
            # (a collect pass with its tiles in pairs runs two tiles per turn of the loop)
            tiles = 2 if gluon and collect and config.gluon_tile_pairs else 1
            resources["warp_instructions_per_similarity"] = (
                None
                if loop is None
                else round(loop * block_warps / (block_q * config.block_n * tiles), 3)
            )
            # Barriers a thread waits at per tile on a loop's common path (BAR.SYNC: the block's
            # or, with a thread count, its warpgroup's in a Gluon partition), the most of any
            # loop: each consumer warpgroup of a Gluon pass has its own, and the analysis that
            # places barriers may treat the default partition's apart.
            resources["barriers_per_tile"] = (
                max(sum("BAR.SYNC" in text for text in path) for path in paths) / tiles
                if paths
                else None
            )
            # Hopper only: ptxas's reason for making each wgmma wait for the one before, if any.
            resources["wgmma_serialized"] = (
                wgmma_serialization(compiled, args.capability) if args.capability == 90 else None
            )
            rows.append({**asdict(config), "pass": "collect" if collect else "bound",
                         "prefilter": args.prefilter, **resources})  # fmt: skip
            print(
                f"{config.block_q:>3}x{config.block_n:<3} w{config.num_warps} s{config.num_stages} "
                f"{config.collect:<6} {config.loads:<7} skip={config.skip_empty_tiles!s:<5} "
                f"{config.kernel} "
                f"stride={config.tile_stride:<2} "
                f"{rows[-1]['pass']:<7} registers {resources.get('reg')}, spill stack "
                f"{resources.get('stack')} B, shared {resources['dynamic_shared']} B, "
                f"{resources['blocks_per_sm']} blocks per SM, "
                f"{resources['warp_instructions_per_similarity']} warp instructions per similarity, "
                f"{resources['barriers_per_tile']} barriers per tile"
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
    # The fused selections of a 256-query, k = 200 search over 1.28M rows.
    selections = []
    for name, compiled in zip(
        ("bound_radix_select", "candidate_sort"), compile_selection_kernels(args.capability),
        strict=True,
    ):  # fmt: skip
        resources = cubin_resources(compiled.asm["cubin"])  # type: ignore[attr-defined]
        selections.append({"kernel": name, **resources})
        print(f"selection, {name}: registers {resources.get('reg')}, spill stack "
              f"{resources.get('stack')} B")  # fmt: skip
    report = {
        "triton": triton.__version__, "capability": args.capability,
        "valid_mask": not args.no_valid, "prefilter": args.prefilter, "kernels": rows,
        "loss_terms_kernels": terms, "selection_kernels": selections,
    }  # fmt: skip
    Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
