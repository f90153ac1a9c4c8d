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
selection of each config, in that order). Without ncu it prints each config's kernel time.
Needs CUDA and Triton.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from look.search_triton import KERNEL_CONFIGS, fused_knn_search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=14_197_122)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--configs", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(args.rows)  # gpu_step.py's inputs for this size
    bank = F.normalize(torch.randn(args.rows, 128, device=device), dim=1).to(torch.bfloat16)
    query = F.normalize(torch.randn(args.queries, 128, device=device), dim=1)
    ids = torch.randint(0, args.rows, (args.queries,), device=device)
    configs = [KERNEL_CONFIGS[position] for position in args.configs]

    def search(position: int) -> None:
        fused_knn_search(query, bank, args.k, query_ids=ids, config=configs[position])

    for position in range(len(configs)):
        search(position)  # compiles (ncu is off until cudaProfilerStart)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cudart = torch.cuda.cudart()
    for position, config in enumerate(configs):
        start.record()
        cudart.cudaProfilerStart()
        search(position)
        cudart.cudaProfilerStop()
        end.record()
        torch.cuda.synchronize()
        print(f"config {args.configs[position]} {config}: {start.elapsed_time(end):.3f} ms")


if __name__ == "__main__":
    main()
