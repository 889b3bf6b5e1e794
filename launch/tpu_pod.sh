#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command on every worker; the workers find each other
# through jax.distributed.initialize() (PICIE_DISTRIBUTED=1, read in picie_jax/parallel.py).
#
#   TPU=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh CONFIG WORKDIR [extra picie-jax flags...]
#   TPU=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh configs/coco_stuff27.py /mnt/shared/runs/coco \
#       --config.dataset.root=/mnt/shared/coco
#
# Prerequisites on every worker: this repository at $REMOTE_DIR (default ~/picie_jax) with a venv
# at $REMOTE_DIR/.venv holding `pip install -e '.[tpu]'`; JAX_COMPILATION_CACHE_DIR (default
# ~/.cache/picie_jax/xla on each worker) keeps the compiled steps; the dataset under the same path.
# WORKDIR must be a directory all workers see (an NFS/Filestore mount): the checkpoints are
# written by all processes together, and the code uses plain file I/O (no gs:// paths).
# Config paths are relative to $REMOTE_DIR. Batch sizes must be multiples of the chip count.
# --dry-run (first argument) prints the gcloud command instead of running it.
set -euo pipefail

# shellcheck source=launch/dry_run.sh
source "$(dirname "${BASH_SOURCE[0]}")/dry_run.sh"
if (( dry_run )); then shift; fi

if [[ $# -lt 2 ]]; then
  echo "usage: TPU=name ZONE=zone $0 [--dry-run] CONFIG WORKDIR [extra picie-jax flags...]" >&2
  exit 2
fi
: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
remote_dir="${REMOTE_DIR:-~/picie_jax}"

# Quote every argument for the remote shell (paths or values with spaces survive the hop).
remote_args="$(printf '%q ' train --config "$1" --workdir "$2" "${@:3}")"
# Each worker keeps its compiled steps on its own disk (a resume skips minutes of compilation).
if [[ -n "${JAX_COMPILATION_CACHE_DIR:-}" ]]; then
  cache_dir="$(printf '%q' "$JAX_COMPILATION_CACHE_DIR")"
else
  # shellcheck disable=SC2088  # the tilde is for the worker's shell to expand
  cache_dir='~/.cache/picie_jax/xla'
fi
remote_cmd="cd ${remote_dir} && PICIE_DISTRIBUTED=1 JAX_COMPILATION_CACHE_DIR=${cache_dir} .venv/bin/picie-jax ${remote_args}"

project_flag=()
if [[ -n "${PROJECT:-}" ]]; then
  project_flag=(--project "$PROJECT")
fi

run gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" "${project_flag[@]}" --worker=all \
  --command "$remote_cmd"
