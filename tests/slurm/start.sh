#!/usr/bin/env bash
# A one-node SLURM on this machine for the scheduler tests (tests/test_slurm.py): installs Debian's
# slurm-wlm and munge when missing (needs root and apt), writes a slurm.conf for all of this host's
# CPUs and starts munged, slurmctld and slurmd. Idempotent: a second call finds them running and only waits for
# the node to be idle. `tests/slurm/stop.sh` stops the daemons.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "tests/slurm/start.sh: needs root (to install slurm-wlm and run slurmd)" >&2; exit 1; }
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || { echo "tests/slurm/start.sh: slurm-wlm and munge are missing and there is no apt-get to install them" >&2; exit 1; }
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) >/dev/null
fi

HOST=$(hostname -s)
# the daemons count the CPUs they may run on: started from a process pinned to fewer (taskset), the
# node would shrink to those
command -v taskset >/dev/null && taskset -cp "0-$(( $(nproc --all) - 1 ))" $$ >/dev/null
CONF=/etc/slurm/slurm.conf
if [ ! -f /etc/munge/munge.key ]; then
  mungekey --create >/dev/null 2>&1 || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
pgrep -x munged >/dev/null || su -s /bin/sh munge -c munged

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
# RealMemory: what the node has, less 2 GiB, so --mem requests are honoured as on a cluster.
MEM=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 2048 ))
cat > "$CONF.new" <<CONFEOF
ClusterName=fathom-test
SlurmctldHost=$HOST
AuthType=auth/munge
CryptoType=crypto/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MinJobAge=600
# a job past its --time, or cancelled, gets SIGTERM and KillWait seconds later SIGKILL
KillWait=10
OverTimeLimit=0
InactiveLimit=0
MessageTimeout=10
NodeName=$HOST CPUs=$(nproc --all) RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONFEOF
if ! cmp -s "$CONF.new" "$CONF" 2>/dev/null; then
  mv "$CONF.new" "$CONF"
  pkill -x slurmctld || true; pkill -x slurmd || true; sleep 1
else
  rm -f "$CONF.new"
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
  state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
  case "$state" in
    idle|mix|alloc) exit 0 ;;
    down*|drain*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 1
done
echo "tests/slurm/start.sh: node $HOST did not become idle (sinfo: ${state:-nothing}); see /var/log/slurm/" >&2
exit 1
