#!/usr/bin/env bash
# One prepared GPU session (the `device` tool lends an H100 for ~15 minutes): the fused search's
# CUDA tests, the step/search benchmark of issue 5, and a full-data CE vs LOOK pre-training as a
# GPU smoke of the training path. Every stage has its own time limit; results go to $OUT.
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
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_search_cuda.py tests/test_search.py 2>&1 | tee "$OUT/pytest.txt" | tail -15

echo "== stage 2: gpu_step benchmark"
timeout 240 python3 benchmarks/gpu_step.py --scan-step --output "$OUT/gpu_step.json" 2>&1 | tee "$OUT/gpu_step.log"

echo "== stage 3: Fashion-MNIST coarse, all 60k images, CE vs LOOK k=1000, 8 epochs (GPU smoke + data point)"
timeout "${STAGE3_S:-220}" python3 benchmarks/ablate_look.py --device cuda --num-workers 12 \
  --train-subset 60000 --epochs 8 --set method.k=1000 --baseline ce \
  --workdir /tmp/ablation --output "$OUT/ablation_gpu.json" 2>&1 | grep -v "step/s" | tee "$OUT/ablation_gpu.log" | tail -20
echo "== done"; date -u
