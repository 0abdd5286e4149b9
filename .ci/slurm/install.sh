#!/usr/bin/env bash
# Installs Debian's SLURM for a single-node CI cluster: munge, slurmctld, slurmd, slurm-client (~5-15 s).
# Idempotent: does nothing when the daemons and sbatch are already there. Needs root (or sudo).
set -euo pipefail
if command -v munged >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
   && command -v sbatch >/dev/null; then
  exit 0
fi
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# Debian's maintainer scripts try to start the services; in containers policy-rc.d refuses, which is fine:
# up.sh starts them itself.
$sudo apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null
