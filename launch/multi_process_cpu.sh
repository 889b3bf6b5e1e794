#!/usr/bin/env bash
# Multi-host on one CPU machine: 2 local processes x 2 fake CPU devices each (a 4-device mesh),
# joined through PICIE_COORDINATOR / PICIE_NUM_PROCESSES / PICIE_PROCESS_ID (picie_jax/parallel.py).
# For testing the multi-host code paths without a pod; it is slower than one process.
#
#   launch/multi_process_cpu.sh [--dry-run] CONFIG WORKDIR [extra picie-jax flags...]
#   launch/multi_process_cpu.sh configs/synthetic.py runs/mp --config.num_epochs=1
#
# Needs picie-jax on PATH (or PICIE_JAX=...). PORT picks the coordinator port (default 12355).
# Process 0 prints to the terminal; process 1 logs to WORKDIR/process1.log. --dry-run prints the
# commands (process 1 is started in the background) instead of running them.
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

shared_env=(JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2
            PICIE_COORDINATOR="127.0.0.1:${PORT:-12355}" PICIE_NUM_PROCESSES=2)
picie=("${PICIE_JAX:-picie-jax}" train --config "$config" --workdir "$workdir" "$@")
worker=(env "${shared_env[@]}" PICIE_PROCESS_ID=1 "${picie[@]}")
worker_log="$workdir/process1.log"

run mkdir -p "$workdir"
if (( dry_run )); then
  echo "$(run "${worker[@]}") >$(printf '%q' "$worker_log") 2>&1 &"
else
  "${worker[@]}" >"$worker_log" 2>&1 &
  worker_pid=$!
  # Do not leave process 1 waiting on a coordinator that has gone away.
  trap 'kill "$worker_pid" 2>/dev/null || true' EXIT
fi

status=0
run env "${shared_env[@]}" PICIE_PROCESS_ID=0 "${picie[@]}" || status=$?
(( dry_run )) && exit 0
worker_status=0
wait "$worker_pid" || worker_status=$?
trap - EXIT
if [[ $worker_status -ne 0 ]]; then
  echo "process 1 exited with $worker_status; see $worker_log" >&2
fi
exit $(( status != 0 ? status : worker_status ))
