#!/usr/bin/env bash
# Train on every GPU of one machine: one process, a data-parallel mesh over all visible GPUs.
#
#   launch/gpu_single_node.sh [--dry-run] CONFIG WORKDIR [extra picie-jax flags...]
#   launch/gpu_single_node.sh configs/coco_stuff27.py runs/coco --config.dataset.root=/data/coco
#
# Needs picie-jax on PATH (activate the venv, or set PICIE_JAX=/path/to/.venv/bin/picie-jax),
# installed with the CUDA extra: `pip install -e '.[cuda12]'`. Restrict GPUs with CUDA_VISIBLE_DEVICES. Batch sizes (kmeans.batch_size,
# train.batch_size, eval.batch_size) must be multiples of the number of GPUs. Re-running the
# same command resumes from the latest checkpoint in WORKDIR. --dry-run prints the command instead.
set -euo pipefail

# shellcheck source=launch/dry_run.sh
source "$(dirname "${BASH_SOURCE[0]}")/dry_run.sh"
if (( dry_run )); then shift; fi

if [[ $# -lt 2 ]]; then
  echo "usage: $0 [--dry-run] CONFIG WORKDIR [extra picie-jax flags...]" >&2
  exit 2
fi
config="$1"
workdir="$2"
shift 2

# JAX preallocates 75% of each GPU by default; TensorFlow (tf.data only) is kept off the GPU
# by picie_jax/main.py, so JAX may take more. JAX_PLATFORMS=cuda makes a jaxlib without the CUDA
# plugin (installed without the cuda12 extra) fail at start instead of training on the CPU.
# The compiled steps persist in JAX_COMPILATION_CACHE_DIR, so a resume skips minutes of
# compilation. Override any of them by exporting it beforehand.
run env XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}" \
  JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}" \
  JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/picie_jax/xla}" \
  "${PICIE_JAX:-picie-jax}" train --config "$config" --workdir "$workdir" "$@"
