"""Compile the fused search's kernels with another Triton version, without a GPU.

    pip download triton==3.6.0 --no-deps -d /tmp/wheels   # the GPU machine's Triton
    python -c "import zipfile, glob; zipfile.ZipFile(glob.glob('/tmp/wheels/triton-*.whl')[0]).extractall('/tmp/triton36')"
    chmod +x /tmp/triton36/triton/backends/nvidia/bin/*
    python benchmarks/compile_with_triton.py --triton-dir /tmp/triton36 --output X.json

The lent GPU machines run an older torch and Triton than this one (session 12: torch 2.11,
Triton 3.6). A kernel that only the newer compiler accepts would show there as a fallback to
the slow scan, in minutes of device time. This script puts the Triton found in ``--triton-dir``
(an unpacked wheel) first on the import path and compiles, for each compute capability, the
bound and collect passes of every config in ``--configs`` (positions in
``look.search_triton.KERNEL_CONFIGS``), with the bf16 rows and with the int8 copy, plus the
selections and the int8 copy's helper kernels, recording registers, spills and, for sm_90,
whether ptxas serialises the wgmma instructions. A kernel that fails to compile is recorded with
its error; the script exits 1 if any did.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from functools import partial
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triton-dir", type=Path, required=True, help="an unpacked Triton wheel")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--configs", type=int, nargs="+", default=[0, 1, 29, 32, 33, 34, 35, 36, 37, 38, 39])
    parser.add_argument("--capabilities", type=int, nargs="+", default=[90, 80])
    args = parser.parse_args()
    if not (args.triton_dir / "triton" / "__init__.py").exists():
        parser.error(f"{args.triton_dir} holds no triton package (unpack a Triton wheel there)")
    sys.path.insert(0, str(args.triton_dir))  # before look imports Triton
    import triton

    from look.search_triton import (
        KERNEL_CONFIGS,
        compile_kernel,
        compile_prefilter_kernels,
        compile_selection_kernels,
        cubin_resources,
        wgmma_serialization,
    )

    print(f"Triton {triton.__version__} from {Path(triton.__file__).parent}")
    rows: list[dict[str, object]] = []

    def record(name: str, capability: int, build) -> None:  # type: ignore[no-untyped-def]
        entry: dict[str, object] = {"kernel": name, "capability": capability}
        try:
            compiled = build()
            entry.update(cubin_resources(compiled.asm["cubin"]))
            if capability == 90 and "pass" in name:
                entry["wgmma_serialized"] = wgmma_serialization(compiled)
        except Exception as error:  # recorded: the point is to see which ones fail
            entry["error"] = f"{type(error).__name__}: {error}"[:2000]
        rows.append(entry)
        print(f"sm_{capability} {name}: " + (
            f"FAILED {entry['error'][:200]}" if "error" in entry  # type: ignore[index]
            else f"registers {entry.get('reg')}, stack {entry.get('stack')} B"
        ))  # fmt: skip

    for capability in args.capabilities:
        for position in args.configs:
            # With and without the valid mask: a full memory (the benchmarks' case) takes none,
            # and Triton 3.6 failed on the Gluon passes only there (session 20).
            for prefilter, collect, has_valid in itertools.product(*[(False, True)] * 3):
                name = (f"config {position} {'collect' if collect else 'bound'} pass"
                        + (" int8" if prefilter else "")
                        + ("" if has_valid else " no valid"))  # fmt: skip
                record(name, capability, partial(
                    compile_kernel, KERNEL_CONFIGS[position], collect=collect,
                    capability=capability, prefilter=prefilter, rows=14_197_122,
                    has_valid=has_valid,
                ))  # fmt: skip
        for names, build in (
            (("bound select", "candidate sort"), compile_selection_kernels),
            (("int8 rescore", "int8 write"), compile_prefilter_kernels),
        ):
            for index, name in enumerate(names):
                record(name, capability, lambda build=build, index=index, capability=capability: (
                    build(capability)[index]
                ))  # fmt: skip
    failed = [row for row in rows if "error" in row]
    report = {"triton": triton.__version__, "kernels": rows, "failed": len(failed)}
    args.output.write_text(json.dumps(report, indent=2))
    print(f"{len(rows) - len(failed)} of {len(rows)} kernels compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
