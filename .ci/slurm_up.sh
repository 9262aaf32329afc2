#!/usr/bin/env bash
# A one-node SLURM on this machine for the tests marked `slurm` (tests/train/test_slurm.py): Debian's slurmctld,
# slurmd and munge, installed if missing, configured for this host (no cgroups, no accounting database) and started
# as plain daemons. Idempotent: returns at once when `sinfo` already shows a usable node (restarting the daemons only
# when this script's configuration changed). Needs root and apt-get the first time; exits non-zero with the reason
# otherwise (the tests then skip, saying why).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# Written by clue_jax .ci/slurm_up.sh"

node_up() {
  sinfo -h -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc)'
}

# The configuration for this host: 4 CPUs at least whatever it has (config_overrides), so that the tests' `srun -n 2`
# and two one-CPU sweep jobs run at the same time, no cgroups, no accounting database (squeue answers, sacct does not).
host=$(hostname -s)
cpus=$(( $(nproc) > 4 ? $(nproc) : 4 ))
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 ))
config="$MARK: one node, this host, for tests.
ClusterName=clue-jax-ci
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
SchedulerParameters=sched_interval=2
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"

ours=false
[ -e "$CONF" ] && grep -qF "$MARK" "$CONF" && ours=true
if command -v sinfo >/dev/null && node_up && { ! $ours || [ "$(cat "$CONF")" = "$config" ]; }; then
  echo "slurm: already up ($(sinfo -h -o '%P %D %c %t' | head -1))"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "slurm: not root; cannot install or start slurmctld/slurmd" >&2
  exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v srun >/dev/null \
    || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || { echo "slurm: no apt-get to install slurm-wlm with" >&2; exit 1; }
  packages=(slurmctld slurmd slurm-client munge)
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null; }
fi

# Only ever our own file: a machine's real slurm.conf is left alone.
if [ -e "$CONF" ] && ! $ours; then
  echo "slurm: $CONF exists and is not ours, but no node is up; start your SLURM or move the file" >&2
  exit 1
fi
mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
if [ -e "$CONF" ] && [ "$(cat "$CONF")" != "$config" ]; then  # Ours, from an older version of this script.
  scontrol shutdown >/dev/null 2>&1 || true
  for _ in $(seq 50); do pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break; sleep 0.2; done
fi
printf '%s\n' "$config" > "$CONF"

# munge: a key, then the daemon as its own user.
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge: /etc/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge && chown munge: /run/munge
if ! munge -n </dev/null >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
fi

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 60); do
  if node_up; then
    echo "slurm: up ($(sinfo -h -o '%P %D %c %t' | head -1))"
    exit 0
  fi
  sleep 0.5
done
echo "slurm: the node did not come up in 30 s; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
exit 1
