#!/usr/bin/env bash
# One prepared GPU session (the `device` tool lends an H100 for ~15 minutes): the fused search's
# CUDA tests, the step/search benchmark of issue 5 (kernel tuning, per-phase times, a profile of
# one LOOK and one CE step) and full-data Fashion-MNIST CE vs LOOK pre-trainings for issue 4.
# Every stage has its own time limit; results go to $OUT.
#   OUT=/tmp/out bash benchmarks/gpu_session.sh    (needs the Fashion-MNIST .gz files in .gpu_data/)
set -uo pipefail
OUT=${OUT:-/tmp/look_gpu}
mkdir -p "$OUT" "$HOME/.cache/look/datasets"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
cp .gpu_data/*.gz "$HOME/.cache/look/datasets/" 2>/dev/null || echo "no Fashion-MNIST in .gpu_data"
{
  date -u; nvidia-smi -L
  python3 -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"
} 2>&1 | tee "$OUT/env.txt"

echo "== stage 1: CUDA search tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_search_cuda.py 2>&1 | tee "$OUT/pytest.txt" | tail -15

echo "== stage 2: gpu_step benchmark"
timeout 240 python3 benchmarks/gpu_step.py --scan-step --tune --profile "$OUT/profile.txt" \
  --output "$OUT/gpu_step.json" 2>&1 | tee "$OUT/gpu_step.log"

echo "== stage 3: Fashion-MNIST coarse, all 60k images: training length and k (issue 4)"
timeout "${STAGE3_S:-200}" python3 benchmarks/ablate_look.py --device cuda --num-workers 12 \
  --train-subset 60000 --epochs 20 --set method.k=1000 --baseline ce \
  --workdir /tmp/ablation20 --output "$OUT/ablation_gpu_e20.json" 2>&1 | grep -v "step/s" | tail -6
timeout "${STAGE4_S:-80}" python3 benchmarks/ablate_look.py --device cuda --num-workers 12 \
  --train-subset 60000 --epochs 8 --set method.k=4000 \
  --workdir /tmp/ablation8 --output "$OUT/ablation_gpu_e8_k4000.json" 2>&1 | grep -v "step/s" | tail -4
echo "== done"; date -u
