"""The fused search's kernels under Nsight Compute: what bounds them on this GPU.

    ncu --profile-from-start off --clock-control none --csv --page details \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section SchedulerStats --section WarpStateStats \
        python benchmarks/search_ncu.py --rows 14197122 --configs 0 23

For each config (positions in ``look.search_triton.KERNEL_CONFIGS``) it builds gpu_step.py's
search inputs (a bank of random unit rows in bf16, 256 random 128-d queries, k = 200,
leave-one-out), runs the search once to compile it, and then once more between
``cudaProfilerStart`` and ``cudaProfilerStop``: with ``--profile-from-start off``, ncu profiles
exactly those launches (the bound pass, the bound's selection, the collect pass and the final
selection of each config, in that order; with ``--prefilter int8`` also the search reading the
bank's int8 copy, whose candidates' re-scoring comes before the final selection). Without ncu it prints each config's time. Needs CUDA
and Triton.

``--summarize ncu.csv --output X.json`` (no GPU needed) reads ncu's CSV and writes, per profiled
kernel launch, its grid, block and the metrics that say what bounds it (duration, DRAM, L2 and
L1 throughput, L2 hit rate, issue rate, occupancy), also printed as a table.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch
from _step_benchmark import random_search_inputs

from look.search_triton import KERNEL_CONFIGS, QuantizedRows, fused_knn_search

# ncu's "details" metrics kept by --summarize (names as ncu prints them).
SUMMARY_METRICS = (
    "Duration",
    "SM Frequency",
    "DRAM Throughput",
    "L2 Cache Throughput",
    "L1/TEX Cache Throughput",
    "Compute (SM) Throughput",
    "L2 Hit Rate",
    "Memory Throughput",
    "Issued Warp Per Scheduler",
    "No Eligible",
    "Achieved Active Warps Per SM",
    "Warp Cycles Per Issued Instruction",
    "Block Limit Registers",
    "Block Limit Shared Mem",
)


def summarize(csv_path: Path) -> list[dict[str, object]]:
    """Per kernel launch of an ``ncu --csv --page details`` listing (the program's own output
    lines, which do not start with a quote, are skipped): ID, kernel, grid, block and
    :data:`SUMMARY_METRICS` as numbers, with their units. PyTorch's elementwise kernels (the
    inputs' set-up) are left out."""
    lines = [line for line in csv_path.read_text().splitlines() if line.startswith('"')]
    if not lines:
        raise ValueError(f"{csv_path} holds no ncu CSV rows")
    launches: dict[int, dict[str, object]] = {}
    for row in csv.DictReader(lines):
        if "elementwise" in row["Kernel Name"] or row["Metric Name"] not in SUMMARY_METRICS:
            continue
        launch = launches.setdefault(int(row["ID"]), {
            "id": int(row["ID"]), "kernel": row["Kernel Name"].split("(")[0],
            "grid": row["Grid Size"], "block": row["Block Size"], "units": {},
        })  # fmt: skip
        launch[row["Metric Name"]] = float(row["Metric Value"].replace(",", ""))
        launch["units"][row["Metric Name"]] = row["Metric Unit"]  # type: ignore[index]
    return [launches[key] for key in sorted(launches)]


def print_summary(launches: list[dict[str, object]]) -> None:
    names = [f"{launch['id']} {launch['kernel']}"[:22] for launch in launches]
    print("metric".ljust(36) + "".join(f"{name:>24}" for name in names))
    for metric in SUMMARY_METRICS:
        cells = "".join(f"{x.get(metric, float('nan')):>24,.2f}" for x in launches)
        print(metric[:36].ljust(36) + cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=14_197_122)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--configs", type=int, nargs="+", default=[0])
    parser.add_argument("--prefilter", nargs="+", choices=["none", "int8"], default=["none"],
                        help="profile each config reading the bf16 bank, its int8 copy, or both")  # fmt: skip
    parser.add_argument("--summarize", type=Path, help="an ncu CSV to summarise (no GPU)")
    parser.add_argument("--output", type=Path, help="with --summarize: the JSON to write")
    args = parser.parse_args()
    if args.summarize:
        launches = summarize(args.summarize)
        print_summary(launches)
        if args.output:
            args.output.write_text(json.dumps(launches, indent=2))
        return
    bank, query, ids = random_search_inputs(args.rows, args.queries, torch.device("cuda"))
    copies = {"none": None}
    if "int8" in args.prefilter:
        copies["int8"] = QuantizedRows.from_memory(bank)
    # (a Gluon config with the int8 copy runs the Triton passes: another config's profile)
    runs = [
        (position, prefilter) for position in args.configs for prefilter in args.prefilter
        if prefilter == "none" or KERNEL_CONFIGS[position].kernel != "gluon"
    ]  # fmt: skip

    def search(position: int, prefilter: str) -> None:
        fused_knn_search(query, bank, args.k, query_ids=ids, config=KERNEL_CONFIGS[position],
                         prefilter=copies[prefilter])  # fmt: skip

    for run in runs:
        search(*run)  # compiles (ncu is off until cudaProfilerStart)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cudart = torch.cuda.cudart()
    for position, prefilter in runs:
        start.record()
        cudart.cudaProfilerStart()
        search(position, prefilter)
        cudart.cudaProfilerStop()
        end.record()
        torch.cuda.synchronize()
        print(f"config {position} {KERNEL_CONFIGS[position]} prefilter={prefilter}: "
              f"{start.elapsed_time(end):.3f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
