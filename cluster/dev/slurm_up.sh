#!/usr/bin/env bash
# Bring up a REAL single-node SLURM cluster on this machine, without systemd (run as root).
#   munged -> [mariadbd -> slurmdbd] -> slurmctld -> slurmd
# Recipe and pitfalls: shared/reference/SLURM_DEV.md. Idempotent: run it again while the cluster is up and it
# rewrites slurm.conf and runs `scontrol reconfigure`; daemons already running are left alone.
#
#   WITH_DBD=1 (default)  accounting through slurmdbd + MariaDB, so `sacct` works. submitit's job.state needs it:
#                         without it a cancelled job makes `job.result()` wait forever.
#   CRED_EXPIRE=10        a requeued job is held (Reason=BeginTime) this long; SLURM's default is 120 s.
#   GRACE_TIME=30         seconds between the preemption USR2 and the kill (must be > 0, see SLURM_DEV.md §7.8).
#   KILL_WAIT=10          seconds between SIGTERM and SIGKILL (ranks != 0 ignore USR2/SIGTERM and wait for it).
#
# Partitions: `debug` (default, PriorityTier=1, PreemptMode=REQUEUE) is preempted by `high` (PriorityTier=10).
# Every daemon this script starts is recorded as "name pid" in $PIDS_FILE; slurm_down.sh stops them by pid.
set -euo pipefail
WITH_DBD=${WITH_DBD:-1}
CRED_EXPIRE=${CRED_EXPIRE:-10}
GRACE_TIME=${GRACE_TIME:-30}
KILL_WAIT=${KILL_WAIT:-10}
STATE_DIR=/run/cratescale-slurm
PIDS_FILE=$STATE_DIR/pids
export DEBIAN_FRONTEND=noninteractive
T_START=$(date +%s%N)
log() { echo "[slurm_up +$(( ($(date +%s%N) - T_START) / 1000000 ))ms] $*"; }
die() { echo "slurm_up: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts slurmd as root)"
[ "$GRACE_TIME" -gt 0 ] 2>/dev/null || die "GRACE_TIME must be > 0 (got '$GRACE_TIME')"
command -v apt-get >/dev/null || die "needs a Debian/Ubuntu machine (apt-get not found)"

install -d -m 0755 "$STATE_DIR"
touch "$PIDS_FILE"
exec 9>"$STATE_DIR/lock"   # daemons below are started with 9>&- so they never inherit the lock
flock -w 120 9 || die "another slurm_up.sh holds $STATE_DIR/lock"   # two test sessions starting it at once

# ---- packages (the slurm-wlm metapackage pulls 43 packages: not used) ---------------------------------
PKGS="slurmctld slurmd slurm-client munge"
[ "$WITH_DBD" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  log "installing:$missing"
  apt-get update -qq || die "apt-get update failed (no network or mirror?)"
  # policy-rc.d (exit 101) keeps the packages' services stopped; we start them by hand below.
  apt-get install -y -qq --no-install-recommends $PKGS >/dev/null || die "apt-get install$missing failed"
  log "installed$missing"
else
  log "packages already installed"
fi

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
record() {  # $1 = name, $2 = pid file written by the daemon itself
  [ -s "$2" ] || die "$1 did not start: no pid file $2 (see /var/log/slurm/ and /var/log/munge/)"
  local pid; pid=$(cat "$2")
  grep -q "^$1 $pid\$" "$PIDS_FILE" || echo "$1 $pid" >> "$PIDS_FILE"
}

# ---- munge ----------------------------------------------------------------------------------------
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge     # no systemd tmpfiles.d here
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1 9>&-   # forks; pid in /run/munge/munged.pid
  for _ in $(seq 1 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  record munged /run/munge/munged.pid
fi
munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"
log "munged ok (pid $(cat /run/munge/munged.pid))"

# ---- directories ----------------------------------------------------------------------------------
install -d -o slurm -g slurm -m 0755 /run/slurm /var/log/slurm /var/lib/slurm/slurmctld
install -d -o root -g root -m 0755 /var/lib/slurm/slurmd

# ---- slurm.conf (node geometry from `slurmd -C`) --------------------------------------------------
HOST=$(hostname -s)
NODELINE=$(slurmd -C | head -1)
val() { sed -n "s/.*[[:space:]]$1=\([0-9]*\).*/\1/p" <<<"$NODELINE"; }
CPUS=$(val CPUs); SOCK=$(val SocketsPerBoard); CORES=$(val CoresPerSocket); THREADS=$(val ThreadsPerCore)
[ -n "$CPUS" ] || die "could not parse 'slurmd -C': $NODELINE"
MEM=$(( $(val RealMemory) * 95 / 100 ))   # below what slurmd detects, or the node drains for "Low RealMemory"
if [ "$WITH_DBD" = 1 ]; then
  ACCT=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost'
else
  ACCT="AccountingStorageType=accounting_storage/none"
fi
cat > /etc/slurm/slurm.conf <<CONF
# Written by cratescale cluster/dev/slurm_up.sh: a single-node dev cluster. Do not edit; rerun the script.
ClusterName=ci
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=cred_expire=${CRED_EXPIRE}
CredType=cred/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
${ACCT}
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# batch_sched_delay=0 and short intervals: submit -> RUNNING in < 1 s, a released requeued job starts in ~2 s
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000,sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# 22.05 spelling; "PreemptParameters=send_user_signal" is a fatal parse error. Without it preemption sends only
# SIGTERM, which submitit ignores: no checkpoint.
SlurmctldParameters=preempt_send_user_signal
KillWait=${KILL_WAIT}
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} SocketsPerBoard=${SOCK} CoresPerSocket=${CORES} ThreadsPerCore=${THREADS} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP PriorityTier=1  PreemptMode=REQUEUE GraceTime=${GRACE_TIME} OverSubscribe=NO
PartitionName=high  Nodes=${HOST} Default=NO  MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF OverSubscribe=NO
CONF
log "wrote /etc/slurm/slurm.conf (node ${HOST}: ${CPUS} cpus, ${MEM} MB)"

# ---- MariaDB + slurmdbd (accounting) ---------------------------------------------------------------
if [ "$WITH_DBD" = 1 ]; then
  install -d -o mysql -g root -m 0755 /run/mysqld
  if ! mariadb-admin ping >/dev/null 2>&1; then
    setsid /usr/sbin/mariadbd --user=mysql </dev/null >>/var/log/slurm/mariadbd.out 2>&1 9>&- &
    for _ in $(seq 1 150); do mariadb-admin ping >/dev/null 2>&1 && break; sleep 0.1; done
    for _ in $(seq 1 50); do [ -s /run/mysqld/mysqld.pid ] && break; sleep 0.1; done
    record mariadbd /run/mysqld/mysqld.pid
  fi
  mariadb-admin ping >/dev/null 2>&1 || die "mariadbd did not start (see /var/log/slurm/mariadbd.out)"
  log "mariadbd ok (pid $(cat /run/mysqld/mysqld.pid))"
  # unix_socket auth: OS user 'slurm' is DB user 'slurm', so there is no password anywhere
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED VIA unix_socket;
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
DebugLevel=info
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StorageLoc=slurm_acct_db
CONF
  chown slurm:slurm /etc/slurm/slurmdbd.conf && chmod 0600 /etc/slurm/slurmdbd.conf   # slurmdbd refuses 0644
  if ! running /run/slurm/slurmdbd.pid; then
    /usr/sbin/slurmdbd </dev/null >/dev/null 2>&1 9>&-
    for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null && break; sleep 0.1; done
    record slurmdbd /run/slurm/slurmdbd.pid
  fi
  (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null || die "slurmdbd not listening (see /var/log/slurm/slurmdbd.log)"
  log "slurmdbd ok (pid $(cat /run/slurm/slurmdbd.pid))"
fi

# ---- slurmctld + slurmd ---------------------------------------------------------------------------
if running /run/slurm/slurmctld.pid; then
  scontrol reconfigure
  log "slurmctld already running: reconfigured"
else
  /usr/sbin/slurmctld </dev/null >/dev/null 2>&1 9>&-     # drops to SlurmUser=slurm; pid file when ready
  for _ in $(seq 1 100); do running /run/slurm/slurmctld.pid && break; sleep 0.1; done
  record slurmctld /run/slurm/slurmctld.pid
fi
if ! running /run/slurm/slurmd.pid; then
  /usr/sbin/slurmd </dev/null >/dev/null 2>&1 9>&-        # must run as root
  for _ in $(seq 1 100); do running /run/slurm/slurmd.pid && break; sleep 0.1; done
  record slurmd /run/slurm/slurmd.pid
fi
state=""
for _ in $(seq 1 200); do   # <= ~40 s
  state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1 || true)
  [ "$state" = idle ] && break
  sleep 0.2
done
if [ "$state" != idle ]; then
  echo "slurm_up: node $HOST is '${state:-not answering}', not idle" >&2
  tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
  exit 1
fi
sinfo
log "cluster up: slurmctld pid $(cat /run/slurm/slurmctld.pid), slurmd pid $(cat /run/slurm/slurmd.pid); pids in $PIDS_FILE"
