#!/usr/bin/env bash
# Starts a SLURM cluster for CI on this one host: $SLURM_CI_NODES nodes (default 2), each one slurmd of its
# own (`slurmd -N`, its own port and loopback address) with all of this host's CPUs and memory and one fake
# GPU; no accounting database. Two nodes let a multi-node job run for real: srun starts one task on each,
# with SLURM_NODEID 0 and 1. No --enable-multiple-slurmd build is needed (whether Debian's has it was not
# checked): that option is about nodes sharing a NodeHostname, and these have distinct ones, with NodeAddr
# 127.0.0.1, 127.0.0.2, ... (all this host's loopback).
# Writes /etc/slurm/{slurm.conf,gres.conf} (the job-step plugin drops SLURM_CONF, so the default location
# is the only one jobs see), starts munged, slurmctld and the slurmds with pid files under $SLURM_CI_RUN,
# and waits until every node is idle. Stop with down.sh. Needs root.
set -euo pipefail
RUN=${SLURM_CI_RUN:-/run/repic-slurm}         # pid files, state, logs
NODES=${SLURM_CI_NODES:-2}
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
# slurmd -C prints this machine's real hardware line (CPUs, sockets, cores, RealMemory).
hardware=$(slurmd -C | head -n1 | sed "s/^NodeName=[^ ]* //")
# A GRES gpu needs File= to be a character device: a stand-in with /dev/null's numbers.
[ -c "$RUN/fake-gpu0" ] || mknod "$RUN/fake-gpu0" c 1 3
names=(); node_lines=""
for i in $(seq 0 $((NODES - 1))); do
  names+=("$host-$i")
  node_lines+="NodeName=$host-$i NodeHostname=$host-$i NodeAddr=127.0.0.$((i + 1)) Port=$((6818 + i)) $hardware"
  node_lines+=" Gres=gpu:1 State=UNKNOWN"$'\n'
done

cat > "$CONF/slurm.conf" <<CONFEOF
$MARK: $NODES nodes on one host, one fake GPU each, no slurmdbd. Safe to delete.
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
SlurmdSpoolDir=$RUN/d/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$RUN/slurmctld.log
SlurmdLogFile=$RUN/slurmd-%n.log
$node_lines
PartitionName=ci Nodes=$(IFS=,; echo "${names[*]}") Default=YES MaxTime=INFINITE State=UP
CONFEOF
cat > "$CONF/gres.conf" <<CONFEOF
$MARK
AutoDetect=off
Name=gpu File=$RUN/fake-gpu0
CONFEOF

# munge: the key comes with the package; run the daemon as its user, socket and pid in its usual place.
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
[ -s /etc/munge/munge.key ] || { mungekey --create --force; chown munge:munge /etc/munge/munge.key; }
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
pid_alive /run/munge/munged.pid || runuser -u munge -- munged --pid-file=/run/munge/munged.pid
pid_alive "$RUN/slurmctld.pid" || slurmctld
for name in "${names[@]}"; do
  mkdir -p "$RUN/d/$name"
  pid_alive "$RUN/slurmd-$name.pid" || slurmd -N "$name"
done

for _ in $(seq 60); do
  states=$(sinfo -h -N -o %T 2>/dev/null | sort | uniq -c | tr -s ' ' || true)
  if [ "$(sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated)$')" -eq "$NODES" ]; then
    echo "slurm up: $NODES nodes (${names[*]}):$states"; exit 0
  fi
  sleep 0.5
done
echo "up.sh: not all $NODES nodes idle after 30 s (states:${states:-none}); logs:" >&2
tail -n 20 "$RUN/slurmctld.log" "$RUN"/slurmd-*.log >&2 || true
exit 1
