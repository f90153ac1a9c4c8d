#!/usr/bin/env bash
# One prepared GPU session (the `device` tool lends an H100 for ~15 minutes): the CUDA tests (fused
# search, fused loss terms, sync-free LOOK step) and the step/search benchmark of issue 5 (kernel
# tuning over the "scan" and "atomic" collect variants, per-phase times, host syncs per step, the
# LOOK step without its memory write, with the write after the optimizer step, with the valid
# mask in every search (a bank not known to be full), with its loss terms in PyTorch, the
# search's phases, candidates and appended tiles for the step's own queries, a profile and a
# trace of LOOK and CE steps with where the GPU idles), then Nsight Compute's view of the
# search's kernels at 14.2M rows (the default tiles and 256-query blocks). Every stage has its
# own time limit; results go to $OUT (8 files). It took 235 s on an H100 in session 12 (run 2).
# It no longer passes --compiled-terms: compiled terms were slower than the fused kernels in
# sessions 11 and 12 (gpu_step.py --compiled-terms still times them).
#   OUT=/tmp/out bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/look_gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
{
  date -u; nvidia-smi -L
  python3 -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"
} 2>&1 | tee "$OUT/env.txt"

echo "== stage 1: CUDA tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_search_cuda.py \
  tests/losses/test_look_terms_cuda.py tests/test_host_sync_cuda.py \
  tests/test_memory.py::test_a_full_cuda_memory_learns_it_without_waiting 2>&1 | tee "$OUT/pytest.txt" | tail -15

echo "== stage 2: gpu_step benchmark"
timeout "${STAGE2_S:-400}" python3 benchmarks/gpu_step.py --scan-step --tune --variants \
  --profile "$OUT/profile.txt" --trace "$OUT/trace" --output "$OUT/gpu_step.json" 2>&1 \
  | tee "$OUT/gpu_step.log"

echo "== stage 3: Nsight Compute, the search's kernels at 14.2M rows"
ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$ncu_bin" ]; then
  # Configs 0 (the default: 64 queries x 32 rows per tile, s = 4) and 23 (256 x 32, 16 warps, s = 2).
  timeout "${STAGE3_S:-150}" "$ncu_bin" --profile-from-start off --clock-control none --csv \
    --page details --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section Occupancy --section SchedulerStats --section WarpStateStats \
    python3 benchmarks/search_ncu.py --rows 14197122 --configs 0 23 > "$OUT/ncu_search.csv" \
    2> "$OUT/ncu_search.log"
  echo "ncu exit $?"; grep "^config" "$OUT/ncu_search.csv"; tail -5 "$OUT/ncu_search.log"
else
  echo "no ncu on this machine"
fi
echo "== done"; date -u
