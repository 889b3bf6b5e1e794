#!/usr/bin/env bash
# The benchmark harness on one GPU (written for an H200; about 11 minutes at most): COCO-shaped
# steps at batch 128 in float32 and bfloat16 with an MFU estimate, ResNet-18 FPN vs ViT-S/8 at
# res1 320, k-means on 32.8 M x 128 points against the memory-bandwidth floor, and the
# projected COCO-Stuff epoch.
#
# UNTESTED ON A GPU: the session that wrote it had none; `--dry-run` (which runs no benchmark)
# is what the tests exercise. Needs jax with CUDA in $PYTHON's environment.
#
#   bash benchmarks/gpu.sh              # writes benchmarks/results/gpu/*.json
#   bash benchmarks/gpu.sh --dry-run    # prints the commands only
#
# Peaks assumed (NVIDIA H200 SXM datasheet, nvidia.com/en-us/data-center/h200, dense, i.e.
# half the "with sparsity" figures): TF32 494.7 TFLOP/s (XLA runs float32 convolutions and
# matmuls in TF32 at JAX's default precision), BF16 989.5 TFLOP/s; HBM3e 4.8 TB/s.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
elif [[ $# -gt 0 ]]; then
  echo "usage: bash benchmarks/gpu.sh [--dry-run]" >&2
  exit 2
fi
PYTHON="${PYTHON:-python}"
OUT="${OUT:-benchmarks/results/gpu}"
TF32_TFLOPS=494.7
BF16_TFLOPS=989.5
HBM_TBS=4.8
KMEANS_POINTS=32768000  # the COCO recipe's k-means init: 20 batches x 256 images x 80 x 80 pixels

cd "$(dirname "$0")/.."

run() {
  echo "+ $*"
  if (( ! DRY_RUN )); then
    "$@" || echo "gpu.sh: '$*' failed or timed out (exit $?); continuing" >&2
  fi
}

if (( ! DRY_RUN )); then
  mkdir -p "$OUT"
fi
COMMON=(--no-peers --coco-batch 128 --repeats 3 --max-foreign-load off)

run timeout 240 "$PYTHON" -m benchmarks.run --only coco,pipeline "${COMMON[@]}" \
  --override eval.batch_size=128 --flops --peak-tflops "$TF32_TFLOPS" --out "$OUT/f32.json"

# Fails (set -e) when $PYTHON cannot load the configs: the wrong environment.
HAS_DTYPE=$("$PYTHON" -c "from configs import common; print('dtype' in common.get_config().model)")
if [[ "$HAS_DTYPE" == True ]]; then
  run timeout 140 "$PYTHON" -m benchmarks.run --only coco_train "${COMMON[@]}" \
    --override model.dtype=bfloat16 --flops --peak-tflops "$BF16_TFLOPS" --out "$OUT/bf16.json"
else
  echo "gpu.sh: skipping the bfloat16 train step: this checkout's configs/common.py has no" \
       "model.dtype field (the bfloat16 switch is not merged yet)"
fi

# ResNet-18 FPN vs DINO ViT-S/8 at COCO's res1 320 (1,600 tokens), batch 16: float32 attention
# materialises B x 6 x 1601^2 x 4 bytes = 0.9 GiB per block and the backward keeps several.
run timeout 180 "$PYTHON" -m benchmarks.run --only backbones --backbones-shape coco \
  --backbones-batch 16 --no-peers --repeats 3 --max-foreign-load off --out "$OUT/backbones.json"

run timeout 100 "$PYTHON" -m benchmarks.run --only kmeans --no-peers --no-memory --repeats 3 \
  --max-foreign-load off --kmeans-sizes "$KMEANS_POINTS" --bandwidth-tbs "$HBM_TBS" \
  --out "$OUT/kmeans.json"
