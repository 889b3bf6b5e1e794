#!/usr/bin/env bash
# Multi-host on one CPU machine: 2 local processes x 2 fake CPU devices each (a 4-device mesh),
# joined through PICIE_COORDINATOR / PICIE_NUM_PROCESSES / PICIE_PROCESS_ID (picie_jax/parallel.py).
# For testing the multi-host code paths without a pod; it is slower than one process.
#
#   launch/multi_process_cpu.sh CONFIG WORKDIR [extra picie-jax flags...]
#   launch/multi_process_cpu.sh configs/synthetic.py runs/mp --config.num_epochs=1
#
# Needs picie-jax on PATH (or PICIE_JAX=...). PORT picks the coordinator port (default 12355).
# Process 0 prints to the terminal; process 1 logs to WORKDIR/process1.log.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [extra picie-jax flags...]" >&2
  exit 2
fi
config="$1"
workdir="$2"
shift 2
mkdir -p "$workdir"

export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=2"
export PICIE_COORDINATOR="127.0.0.1:${PORT:-12355}"
export PICIE_NUM_PROCESSES=2

picie=("${PICIE_JAX:-picie-jax}" train --config "$config" --workdir "$workdir" "$@")

PICIE_PROCESS_ID=1 "${picie[@]}" >"$workdir/process1.log" 2>&1 &
worker_pid=$!
# Do not leave process 1 waiting on a coordinator that has gone away.
trap 'kill "$worker_pid" 2>/dev/null || true' EXIT

status=0
PICIE_PROCESS_ID=0 "${picie[@]}" || status=$?
worker_status=0
wait "$worker_pid" || worker_status=$?
trap - EXIT
if [[ $worker_status -ne 0 ]]; then
  echo "process 1 exited with $worker_status; see $workdir/process1.log" >&2
fi
exit $(( status != 0 ? status : worker_status ))
