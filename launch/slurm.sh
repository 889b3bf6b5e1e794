#!/usr/bin/env bash
# Train on several SLURM nodes: `srun` starts one process per node (driving all its GPUs) or one
# per GPU. Process 0 runs on the first node of the job and hosts the jax.distributed coordinator;
# every process gets PICIE_COORDINATOR / PICIE_NUM_PROCESSES / PICIE_PROCESS_ID
# (picie_jax/parallel.py) from SLURM's variables.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm.sh CONFIG WORKDIR [extra picie-jax flags...]
#   PROCESS_PER=gpu sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 \
#       launch/slurm.sh configs/coco_stuff27.py /shared/runs/coco --config.dataset.root=/shared/coco
#   launch/slurm.sh --dry-run CONFIG WORKDIR ...   # prints the srun command, runs nothing
#
# Run it with sbatch or inside salloc (it reads SLURM_JOB_ID, SLURM_JOB_NODELIST and
# SLURM_JOB_NUM_NODES). Environment: PROCESS_PER=node (default) or gpu; GPUS_PER_NODE for
# PROCESS_PER=gpu (default SLURM_GPUS_ON_NODE); PORT (default 61440 + SLURM_JOB_ID % 4096, the
# port jax itself would pick); PICIE_JAX (default picie-jax on PATH). With PROCESS_PER=gpu each
# task keeps the GPU numbered SLURM_LOCALID among those it sees (JAX_LOCAL_DEVICE_IDS), so do not
# let srun bind one GPU per task. WORKDIR must be on a file system every node sees: checkpoints
# are written by all processes together. Re-submitting the same command resumes the run.
# JAX_PLATFORMS (default cuda: a jaxlib without the cuda12 extra fails at start instead of
# training on CPUs) and JAX_COMPILATION_CACHE_DIR (default ~/.cache/picie_jax/xla: compiled
# steps persist, a resume skips their compilation) pass through when exported.
# The script is self-contained (sbatch runs a copy of it from its spool directory).
set -euo pipefail

dry_run=0
if [[ "${1:-}" == --dry-run ]]; then
  dry_run=1
  shift
fi

# Runs a command, or with --dry-run prints it (shell-quoted) instead.
run() {
  if (( dry_run )); then
    local quoted
    quoted="$(printf '%q ' "$@")"
    echo "${quoted% }"
  else
    "$@"
  fi
}

if [[ $# -lt 2 ]]; then
  echo "usage: sbatch [sbatch options] $0 [--dry-run] CONFIG WORKDIR [extra picie-jax flags...]" >&2
  exit 2
fi
: "${SLURM_JOB_ID:?not inside a SLURM job: submit with sbatch or run inside salloc}"
: "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}"
: "${SLURM_JOB_NUM_NODES:?SLURM_JOB_NUM_NODES is not set}"
config="$1"
workdir="$2"
shift 2

# The first host of a SLURM node list: 'gpu[003-004,010],cpu1' -> gpu003, 'a,b' -> a.
first_host() {
  local list="$1" prefix rest
  prefix="${list%%[,[]*}"
  if [[ "${list:${#prefix}:1}" == "[" ]]; then
    rest="${list:${#prefix}+1}"
    echo "${prefix}${rest%%[-,\]]*}"
  else
    echo "$prefix"
  fi
}

nodes="$SLURM_JOB_NUM_NODES"
# Each task reads its own rank when it starts (single quotes: expanded by the task's shell).
# shellcheck disable=SC2016
task_env='PICIE_PROCESS_ID="$SLURM_PROCID"'
case "${PROCESS_PER:-node}" in
  node)
    tasks_per_node=1
    ;;
  gpu)
    tasks_per_node="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
    if [[ -z "$tasks_per_node" ]]; then
      echo "PROCESS_PER=gpu needs GPUS_PER_NODE (SLURM_GPUS_ON_NODE is not set)" >&2
      exit 2
    fi
    # shellcheck disable=SC2016
    task_env+=' JAX_LOCAL_DEVICE_IDS="$SLURM_LOCALID"'
    ;;
  *)
    echo "PROCESS_PER must be 'node' or 'gpu', got '${PROCESS_PER}'" >&2
    exit 2
    ;;
esac
port="${PORT:-$(( 61440 + SLURM_JOB_ID % 4096 ))}"

run srun --nodes="$nodes" --ntasks="$(( nodes * tasks_per_node ))" \
  --ntasks-per-node="$tasks_per_node" --kill-on-bad-exit=1 \
  env PICIE_COORDINATOR="$(first_host "$SLURM_JOB_NODELIST"):$port" \
  PICIE_NUM_PROCESSES="$(( nodes * tasks_per_node ))" \
  XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}" \
  JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}" \
  JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/picie_jax/xla}" \
  bash -c "export $task_env; exec \"\$@\"" picie-task \
  "${PICIE_JAX:-picie-jax}" train --config "$config" --workdir "$workdir" "$@"
