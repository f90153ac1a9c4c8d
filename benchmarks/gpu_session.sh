#!/usr/bin/env bash
# One prepared GPU session (the `device` tool lends an H100 or an H200 for ~15 minutes, at most
# 600 s per command), in two parts so that each fits one command; results go to $OUT.
#
# Part 1 (default; stages capped at 100 + 90 + 150 + 200 + 90 + 120 s, or 100 + 90 + 40 + 200
# + 120 when the Gluon tests fail: stage 2b runs only then, stages 3 and 4b only otherwise;
# session 22's whole part 1 took 193 s, and the command's own timeout of 578 s below cuts the
# last stage short if the others ever run to their caps):
#   1. the CUDA tests (fused search with and without the int8 copy, fused loss terms, sync-free
#      LOOK step; the graph replay's test runs in part 2);
#   2. the Gluon passes' CUDA tests (session 14; first passed in session 20, on an H200; their
#      own time limit, in case its barriers deadlock); if they fail (and did not time out), each
#      Gluon pass alone against tests/gluon_reference.py, to say which pass is wrong;
#   3. the search alone, config 0 against the Gluon configs 36-38, 40 and 41 (session 23:
#      config 36's collect pass with its tiles in pairs, 2 warpgroup barriers per tile instead
#      of 3, and with its buffers also freed a pair at a time, 1.5), bf16 bank
#      (search_tune.py), and configs 36 and 41 with every 8th tile in their bound pass (fewer
#      products, more candidates), 36 with every 2nd (at 1.28M rows 73 % of its collect pass's
#      tiles append; half the candidates would cut that) and 36 with 4 or 12 buffers in its
#      ring (session 22's idea list, docs/results.md);
#   4. the step/search benchmark of issue 5, timed alternately with CE, with the search against
#      both its floors (the bank read, and its products at the measured matmul rate); the int8
#      copy's step (--prefilter-step) was slower in session 20 and is no longer timed here;
#   4b. the step at 14.2M rows with the search of the config stage 3 found fastest there, if
#      it is not Hopper's default (config 36, timed in stage 4);
#   5. Nsight Compute at 14.2M rows, bf16 bank: the Gluon configs 36, 40 and 41 (config 0's
#      profile is session 22's): is the collect pass still held at its barriers?
# Part 2 (PART=2; capped at 120 + 40 + 60 + 2 × 30 + 120 s):
#   6. the search alone for the configs session 12 left untimed (s = 8, TMA copies), the
#      default, the int8 bound pass and the Triton bound pass of bins (config 39, session 14),
#      each reading the bf16 bank and its int8 copy;
#   6b. the CUDA graph replay (session 15: set_graph_replay): its CUDA test, then the default,
#      config 29 and the Gluon config 36 timed launched and replayed if the test passed;
#   6c. the host time of one search, launched and replayed;
#   7. Nsight Compute's view of the default's kernels at 14.2M rows, bf16 and int8, and of the
#      Gluon config 36 on the bf16 bank.
# (Session 22 ran stage 5's profile, then changed config 36's collect pass and made it the
# default on Hopper, so stage 4 now times config 36 there: docs/results.md, "Session 22".
# Session 23's candidates, configs 40 and 41, are timed in stages 3, 4b and 5.)
#   OUT=/tmp/out bash benchmarks/gpu_session.sh            # part 1
#   OUT=/tmp/out PART=2 bash benchmarks/gpu_session.sh     # part 2
# The device tool returns at most 8 files from its $OUT: write to another folder and pack it, as
# session 20 did (one command):
#   OUT=/tmp/o timeout 578 bash benchmarks/gpu_session.sh; tar -czf $OUT/part1.tar.gz -C /tmp/o .
set -uo pipefail
OUT=${OUT:-/tmp/look_gpu}
PART=${PART:-1}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1

# Nsight Compute's view of a command's kernels (at most 120 s): $OUT/NAME.csv and NAME.log.
nsight_compute() {
  local name=$1; shift
  local ncu_bin
  ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [ -z "$ncu_bin" ]; then
    echo "no ncu on this machine"; return
  fi
  timeout 120 "$ncu_bin" --profile-from-start off --clock-control none --csv \
    --page details --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section Occupancy --section SchedulerStats --section WarpStateStats \
    "$@" > "$OUT/$name.csv" 2> "$OUT/$name.log"
  echo "ncu exit $?"; grep "^config" "$OUT/$name.csv"; tail -5 "$OUT/$name.log"
}
{
  date -u; nvidia-smi -L
  python3 -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"
} 2>&1 | tee "$OUT/env_part$PART.txt"

if [ "$PART" = 1 ]; then
  echo "== stage 1: CUDA tests"
  timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_search_cuda.py \
    tests/losses/test_look_terms_cuda.py tests/test_host_sync_cuda.py \
    tests/test_memory.py::test_a_full_cuda_memory_learns_it_without_waiting \
    -k "not replayed" 2>&1 | tee "$OUT/pytest.txt" | tail -15

  echo "== stage 2: the Gluon passes' CUDA tests"
  # (5 Gluon configs since session 23, 3 before: 90 s, not 50, before a time-out skips stage 3)
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_search_gluon_cuda.py \
    -k "not writes_what_the_reference" 2>&1 | tee "$OUT/pytest_gluon.txt" | tail -15
  gluon_tests=${PIPESTATUS[0]}  # 0: every Gluon test passed; 124: timed out (a deadlock?)
  if [ "$gluon_tests" != 0 ] && [ "$gluon_tests" != 124 ]; then
    echo "== stage 2b: which Gluon pass is wrong (each alone against tests/gluon_reference.py)"
    timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_search_gluon_cuda.py \
      -k writes_what_the_reference 2>&1 | tee "$OUT/pytest_gluon_passes.txt" | tail -25
  fi

  echo "== stage 3: the search alone, the default against the Gluon configs"
  if [ "$gluon_tests" = 0 ]; then
    # (14.2M rows first: the JSON is written after each size, and that one is issue 5's)
    timeout 150 python3 benchmarks/search_tune.py --configs 0 36 37 38 40 41 --prefilter none \
      --variant 36:tile_stride=8 --variant 36:num_stages=4 --variant 36:num_stages=12 \
      --variant 41:tile_stride=8 --variant 36:tile_stride=2 --rows 14197122 1281167 \
      --output "$OUT/search_tune_gluon.json" 2>&1 | tee "$OUT/search_tune_gluon.log"
  else
    echo "skipped: the Gluon tests exited with $gluon_tests (see pytest_gluon.txt)"
  fi

  echo "== stage 4: gpu_step benchmark (LOOK alternating with CE; the search against its floors)"
  timeout 200 python3 benchmarks/gpu_step.py \
    --output "$OUT/gpu_step.json" 2>&1 | tee "$OUT/gpu_step.log"

  echo "== stage 4b: the step at 14.2M rows with stage 3's fastest config, if not the default"
  fastest=$(python3 benchmarks/search_tune.py --output "$OUT/search_tune_gluon.json" \
    --fastest-exact 14197122 2>/dev/null)
  if [ -n "$fastest" ] && [ "$fastest" != 36 ]; then
    timeout 90 python3 benchmarks/gpu_step.py --rows 14197122 --search-config "$fastest" \
      --output "$OUT/gpu_step_fastest.json" 2>&1 | tee "$OUT/gpu_step_fastest.log"
  else
    echo "skipped: stage 3's fastest at 14.2M rows is '${fastest:-none}' (36: stage 4 timed it)"
  fi

  echo "== stage 5: Nsight Compute at 14.2M rows, bf16: the Gluon configs 36, 40, 41"
  nsight_compute ncu_search_part1 \
    python3 benchmarks/search_ncu.py --rows 14197122 --configs 36 40 41 --prefilter none
else
  echo "== stage 6: the search alone, bf16 bank and int8 copy"
  timeout 120 python3 benchmarks/search_tune.py --configs 0 1 29 32 33 34 35 39 \
    --prefilter none int8 --output "$OUT/search_tune.json" 2>&1 | tee "$OUT/search_tune.log"

  echo "== stage 6b: the search replayed from a CUDA graph recording: its test, then its time"
  timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_search_cuda.py -k replayed 2>&1 \
    | tee "$OUT/pytest_replay.txt" | tail -15
  if [ "${PIPESTATUS[0]}" = 0 ]; then
    timeout 60 python3 benchmarks/search_tune.py --configs 0 29 36 --graph-replay \
      --output "$OUT/search_tune_replay.json" 2>&1 | tee "$OUT/search_tune_replay.log"
  else
    echo "skipped: the replay test failed (see pytest_replay.txt)"
  fi
  echo "== stage 6c: host time of one search (1.28M rows), launched and replayed"
  for replay in "" "--graph-replay"; do
    timeout 30 python3 benchmarks/search_host_overhead.py --device cuda $replay \
      --output "$OUT/search_host${replay:+_replay}.json" 2>&1 | tee -a "$OUT/search_host.log"
  done

  echo "== stage 7: Nsight Compute at 14.2M rows: the default, bf16 and int8; Gluon config 36"
  nsight_compute ncu_search \
    python3 benchmarks/search_ncu.py --rows 14197122 --configs 0 36 --prefilter none int8
fi
echo "== done"; date -u
