#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for trying the launchers (slurm/*.sh, launch.submit)
# and for the test suite: munge + slurmctld + N slurmd "nodes" named 127.0.0.1 .. 127.0.0.N on
# loopback, from Debian's packages, no systemd, no accounting database.
#
#   bash launch/local_slurm.sh start    # installs the packages if missing (root), starts the daemons
#   source "$BIGTRAIN_SLURM_ROOT/env.sh" # SLURM_CONF for sbatch/srun/squeue in this shell
#   bash launch/local_slurm.sh stop     # cancels jobs, stops what start started
#   bash launch/local_slurm.sh status
#
# Environment (defaults):
#   BIGTRAIN_SLURM_ROOT=${TMPDIR:-/tmp}/bigtrain-slurm  config, state, logs and pid files
#   BIGTRAIN_SLURM_NODES=2        slurmd daemons (nodes); names are loopback addresses so that the
#                                 first host of a job's nodelist is a reachable MASTER_ADDR
#   BIGTRAIN_SLURM_CPUS=4         CPUs each node advertises (may exceed the real cores:
#                                 SlurmdParameters=config_overrides)
#   BIGTRAIN_SLURM_PORT=6917      slurmctld port; slurmd ports follow it
#
# Choices that differ from a production cluster, and why:
#   - ProctrackType=proctrack/linuxproc, TaskPlugin=task/none: containers have no cgroup delegation;
#     processes are tracked through their parent pids.
#   - AuthInfo=cred_expire=10 and a 2 s scheduler interval: a requeued job starts again ~10 s later
#     instead of the default ~2 minutes, so requeue tests take seconds.
#   - No slurmdbd: sacct is unavailable, so job state comes from `scontrol show job`, which keeps
#     finished jobs for MinJobAge=600 s (submitit then reports state UNKNOWN; results still arrive).
#   - KillWait=5: a job past its time limit gets SIGTERM, then SIGKILL 5 s later.
set -euo pipefail
ROOT=${BIGTRAIN_SLURM_ROOT:-${TMPDIR:-/tmp}/bigtrain-slurm}
NODES=${BIGTRAIN_SLURM_NODES:-2}
CPUS=${BIGTRAIN_SLURM_CPUS:-4}
PORT=${BIGTRAIN_SLURM_PORT:-6917}
CONF=$ROOT/etc/slurm.conf
export SLURM_CONF=$CONF

say() { echo "[local_slurm] $*"; }
fail() { echo "[local_slurm] error: $*" >&2; exit 1; }
retry() { # retry SECONDS CMD...: until CMD succeeds, every 0.25 s
  local tries=$(( $1 * 4 )); shift
  for _ in $(seq "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  return 1
}
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_names() { local i; for i in $(seq "$NODES"); do echo "127.0.0.$i"; done; }

install_packages() {
  local pkgs="munge slurmctld slurmd slurm-client" missing="" p
  for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
  [ -z "$missing" ] && return 0
  [ "$(id -u)" = 0 ] || fail "Slurm is not installed and installing it needs root (apt-get install$missing)"
  command -v apt-get >/dev/null || fail "Slurm is not installed and there is no apt-get to install it"
  say "installing:$missing"
  mkdir -p "$ROOT/log"
  # Keep the packages' maintainer scripts from starting daemons of their own (policy-rc.d 101).
  local policy_made=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; policy_made=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing; } >"$ROOT/log/apt.log" 2>&1 \
    || { [ $policy_made = 1 ] && rm -f /usr/sbin/policy-rc.d; tail -5 "$ROOT/log/apt.log" >&2; fail "apt-get failed"; }
  [ $policy_made = 1 ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

write_config() {
  local mem_mb node_mem
  mem_mb=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)
  node_mem=$(( mem_mb * 8 / 10 / NODES ))
  mkdir -p "$ROOT"/{etc,state,log,run}
  cat >"$CONF" <<EOF
# written by launch/local_slurm.sh
ClusterName=bigtrain
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=cred_expire=10
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/state/d-%n
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd-%n.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=5
Waittime=0
NodeName=127.0.0.[1-$NODES] NodeHostname=localhost Port=$((PORT + 10))-$((PORT + 9 + NODES)) CPUs=$CPUS RealMemory=$node_mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  echo "export SLURM_CONF=$CONF" >"$ROOT/env.sh"
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi  # a running munged is reused
  mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
      || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
  fi
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged
  retry 10 sh -c 'munge -n | unmunge' || fail "munged did not start (see /var/log/munge/munged.log)"
  cp /run/munge/munged.pid "$ROOT/run/munged.pid"  # ours: stop kills it
}

start() {
  install_packages
  write_config
  start_munge
  if ! alive "$ROOT/run/slurmctld.pid"; then
    # Another controller on our port (a second root, or a real cluster) would answer our pings.
    ! scontrol ping >/dev/null 2>&1 || fail "a slurmctld already answers on port $PORT (set BIGTRAIN_SLURM_PORT)"
    slurmctld
  fi
  retry 30 scontrol ping || { tail -5 "$ROOT/log/slurmctld.log" >&2; fail "slurmctld did not answer"; }
  local n
  for n in $(node_names); do alive "$ROOT/run/slurmd-$n.pid" || slurmd -N "$n"; done
  all_idle() { [ "$(sinfo -h -N -o '%T' | grep -cx idle)" = "$NODES" ]; }
  retry 60 all_idle || { sinfo -N >&2; tail -5 "$ROOT/log/slurmctld.log" >&2; fail "nodes did not become idle"; }
  timeout 60 srun -N "$NODES" -n "$NODES" -t 1 true || fail "srun smoke test failed"
  say "up: $NODES nodes x $CPUS CPUs ($(slurmctld -V)); source $ROOT/env.sh"
}

stop_pid() { # stop_pid PIDFILE: SIGTERM, SIGKILL after 10 s
  local pid
  [ -s "$1" ] || return 0
  pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    retry 10 sh -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}

stop() {
  if [ -f "$CONF" ] && scontrol ping >/dev/null 2>&1; then
    # Jobs first: their processes would outlive slurmd otherwise.
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [ -n "${jobs// }" ]; then
      scancel $jobs || true
      retry 20 sh -c '[ -z "$(squeue -h)" ]' || true
    fi
  fi
  local pf
  for pf in "$ROOT"/run/slurmd-*.pid; do [ -e "$pf" ] && stop_pid "$pf"; done
  stop_pid "$ROOT/run/slurmctld.pid"
  stop_pid "$ROOT/run/munged.pid"
  say "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) scontrol ping && sinfo -N ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
