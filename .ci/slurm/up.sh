#!/usr/bin/env bash
# Starts a single-node SLURM cluster for CI: this host, all its CPUs and memory, one fake GPU, no
# accounting database. Writes /etc/slurm/{slurm.conf,gres.conf} (the job-step plugin drops SLURM_CONF,
# so the default location is the only one jobs see), starts munged, slurmctld and slurmd with pid files
# under $SLURM_CI_RUN, and waits until the node is idle. Stop with down.sh. Needs root.
set -euo pipefail
RUN=${SLURM_CI_RUN:-/run/repic-slurm}         # pid files, state, logs
CONF=/etc/slurm
MARK="# written by repic .ci/slurm/up.sh"

[ "$(id -u)" -eq 0 ] || { echo "up.sh: needs root" >&2; exit 2; }
for f in "$CONF/slurm.conf" "$CONF/gres.conf"; do
  if [ -e "$f" ] && ! grep -qF "$MARK" "$f"; then
    echo "up.sh: $f exists and is not ours; refusing to overwrite a real cluster's configuration" >&2
    exit 2
  fi
done
mkdir -p "$RUN"/{ctld,d,munge} "$CONF"

host=$(hostname -s)
# slurmd -C prints this machine's real NodeName line (CPUs, sockets, cores, RealMemory).
node=$(slurmd -C | head -n1 | sed "s/^NodeName=[^ ]*/NodeName=$host/")
# A GRES gpu needs File= to be a character device: a stand-in with /dev/null's numbers.
[ -c "$RUN/fake-gpu0" ] || mknod "$RUN/fake-gpu0" c 1 3

cat > "$CONF/slurm.conf" <<CONFEOF
$MARK: one node, one fake GPU, no slurmdbd. Safe to delete.
ClusterName=repic-ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
GresTypes=gpu
ReturnToService=2
# squeue is the job-status source without slurmdbd: it must still list a finished job when the executor
# plugin polls (its interval backs off to 180 s), so keep jobs >= 3 x the plugin's first check and more.
MinJobAge=300
KillWait=5
InactiveLimit=0
StateSaveLocation=$RUN/ctld
SlurmdSpoolDir=$RUN/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$RUN/slurmctld.log
SlurmdLogFile=$RUN/slurmd.log
$node NodeAddr=127.0.0.1 Gres=gpu:1 State=UNKNOWN
PartitionName=ci Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONFEOF
cat > "$CONF/gres.conf" <<CONFEOF
$MARK
AutoDetect=off
NodeName=$host Name=gpu File=$RUN/fake-gpu0
CONFEOF

# munge: the key comes with the package; run the daemon as its user, socket and pid in its usual place.
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
[ -s /etc/munge/munge.key ] || { mungekey --create --force; chown munge:munge /etc/munge/munge.key; }
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
pid_alive /run/munge/munged.pid || runuser -u munge -- munged --pid-file=/run/munge/munged.pid
pid_alive "$RUN/slurmctld.pid" || slurmctld
pid_alive "$RUN/slurmd.pid" || slurmd

for _ in $(seq 60); do
  state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
  case "$state" in idle|mixed|allocated) echo "slurm up: node $host $state"; exit 0;; esac
  sleep 0.5
done
echo "up.sh: node $host not idle after 30 s (state: ${state:-none}); logs:" >&2
tail -n 20 "$RUN/slurmctld.log" "$RUN/slurmd.log" >&2 || true
exit 1
