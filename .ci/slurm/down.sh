#!/usr/bin/env bash
# Stops what up.sh started, by the daemons' pid files (each node's slurmd, slurmctld, munged), and waits for each.
set -uo pipefail
RUN=${SLURM_CI_RUN:-/run/repic-slurm}
for pidfile in "$RUN"/slurmd-*.pid "$RUN/slurmd.pid" "$RUN/slurmctld.pid" /run/munge/munged.pid; do
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
  fi
  rm -f "$pidfile"
done
echo "slurm down"
