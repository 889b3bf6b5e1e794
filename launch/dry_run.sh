#!/usr/bin/env bash
# Sourced by the launch scripts (not run): takes a leading --dry-run off "$@" and defines
# `run`, which runs a command or, with --dry-run, prints it shell-quoted instead.
# launch/slurm.sh keeps its own copy: sbatch runs a copy of it from its spool directory.
# shellcheck disable=SC2034  # dry_run is read by run() in the sourcing script's shell
dry_run=0
if [[ "${1:-}" == --dry-run ]]; then
  dry_run=1
fi

run() {
  if (( dry_run )); then
    local quoted
    quoted="$(printf '%q ' "$@")"
    echo "${quoted% }"
  else
    "$@"
  fi
}
