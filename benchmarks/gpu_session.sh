#!/usr/bin/env bash
# One prepared GPU session (the `device` tool lends an H100 for ~15 minutes): the CUDA tests (fused
# search with and without the int8 copy, fused loss terms, sync-free LOOK step); the step/search
# benchmark of issue 5 with the LOOK step also reading the int8 copy (--prefilter-step), timed
# alternately with CE: the question of session 13, first; the search alone for the configs
# session 12 left untimed (s = 8, TMA copies), the default and the int8 bound pass, each reading
# the bf16 bank and its int8 copy (search_tune.py); then Nsight Compute's view of the default's
# kernels at 14.2M rows, bf16 and int8. Every stage has its own time limit; results go to $OUT.
# Session 12's version (tuning, variants, profile, trace) took 235 s; the stages below are capped
# at 150 + 200 + 120 + 120 s, under the device tool's 600 s per command.
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

echo "== stage 2: gpu_step benchmark (LOOK with and without the int8 copy, alternating with CE)"
timeout "${STAGE2_S:-200}" python3 benchmarks/gpu_step.py --prefilter-step \
  --output "$OUT/gpu_step.json" 2>&1 | tee "$OUT/gpu_step.log"

echo "== stage 3: the search alone, bf16 bank and int8 copy"
timeout "${STAGE3_S:-120}" python3 benchmarks/search_tune.py --configs 0 1 29 32 33 34 35 \
  --prefilter none int8 --output "$OUT/search_tune.json" 2>&1 | tee "$OUT/search_tune.log"

echo "== stage 4: Nsight Compute, the default's kernels at 14.2M rows, bf16 and int8"
ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$ncu_bin" ]; then
  timeout "${STAGE4_S:-120}" "$ncu_bin" --profile-from-start off --clock-control none --csv \
    --page details --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section Occupancy --section SchedulerStats --section WarpStateStats \
    python3 benchmarks/search_ncu.py --rows 14197122 --configs 0 --prefilter none int8 \
    > "$OUT/ncu_search.csv" 2> "$OUT/ncu_search.log"
  echo "ncu exit $?"; grep "^config" "$OUT/ncu_search.csv"; tail -5 "$OUT/ncu_search.log"
else
  echo "no ncu on this machine"
fi
echo "== done"; date -u
