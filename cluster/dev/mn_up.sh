#!/usr/bin/env bash
# Bring up a REAL N-node SLURM cluster on this machine (run as root): one network + UTS + mount namespace per
# node (hostname nodeN, IP $MN_NET.(10+N) on bridge $MN_BRIDGE, no default route), one slurmd per node, and a
# private munged + MariaDB + slurmdbd + slurmctld in the root namespace. Recipe, measurements and the 18
# pitfalls: shared/reference/SLURM_MULTINODE.md. Clients use SLURM_CONF=$MN/etc/slurm.conf.
#
#   NODES=3 bash cluster/dev/mn_up.sh      (make slurm-up NODES=3)
#
# Idempotent: rerun while up, it rewrites slurm.conf, `scontrol reconfigure`s and restarts only dead daemons
# (also how a killed node comes back). Packages: the single-node script installs them (same set).
# Every pid it starts is in $MN/run/pids; mn_down.sh stops them by pid.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/mn_env.sh"
NODES=${NODES:-2}
CRED_EXPIRE=${CRED_EXPIRE:-10}
KILL_WAIT=${KILL_WAIT:-5}
GRACE_TIME=${GRACE_TIME:-30}
T_START=$(date +%s%N)
log() { echo "[mn_up +$(( ($(date +%s%N) - T_START) / 1000000 ))ms] $*"; }
die() { echo "mn_up: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (namespaces, slurmd)"
[[ "$NODES" =~ ^[1-9][0-9]?$ ]] && [ "$NODES" -le 50 ] || die "NODES must be 1..50 (got '$NODES')"
for b in slurmctld slurmd slurmdbd munged mariadbd nsenter unshare ip; do
  command -v "$b" >/dev/null || PATH=$PATH:/usr/sbin:/sbin command -v "$b" >/dev/null \
    || die "$b not found: run cluster/dev/slurm_up.sh once (it installs the packages)"
done
install -d -m 0755 "$MN"/{etc,run,spool}
install -d -o slurm -g slurm "$MN"/{state,log}
install -d -o munge -g munge -m 0755 "$MN/munge"   # clients need x on the socket dir
exec 9>"$MN/run/lock"; flock -w 120 9 || die "another mn_up.sh holds $MN/run/lock"
touch "$MN/run/pids"
alive() {  # pid $1 runs program $2 (not a zombie: a killed daemon lingers until reaped)
  [ -n "${1:-}" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] \
    && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
record() { echo "$1 $2" >> "$MN/run/pids"; }

# ---- bridge, namespaces, hosts file (pitfall 18: rewrite in place, the nodes bind-mount it) -------------------
ip link show "$MN_BRIDGE" >/dev/null 2>&1 || {
  ip link add "$MN_BRIDGE" type bridge && ip addr add "$MN_NET.1/24" dev "$MN_BRIDGE"; }
ip link set "$MN_BRIDGE" up
HOST=$(hostname -s)
{ printf '127.0.0.1 localhost\n%s %s\n' "$MN_NET.1" "$HOST"
  for i in $(seq 1 "$NODES"); do echo "$MN_NET.$((10 + i)) node$i"; done; } > "$MN/etc/hosts.new"
if [ -e "$MN/etc/hosts" ]; then cat "$MN/etc/hosts.new" > "$MN/etc/hosts"; else mv "$MN/etc/hosts.new" "$MN/etc/hosts"; fi
rm -f "$MN/etc/hosts.new"
for i in $(seq 1 "$NODES"); do
  ns=$(mn_netns "$i")
  if ! ip netns list | grep -qw "$ns"; then
    ip netns add "$ns"
    ip link add "csmn$i-h" type veth peer name eth0 netns "$ns"
    ip link set "csmn$i-h" master "$MN_BRIDGE" up
    ip -n "$ns" addr add "$MN_NET.$((10 + i))/24" dev eth0
    ip -n "$ns" link set eth0 up; ip -n "$ns" link set lo up
  fi
  if ! alive "$(mn_anchor "$i")" sleep; then
    # Not `ip netns exec` (pitfall 1: it remounts /sys and slurmd loses its cgroup mount). The anchor holds the
    # UTS + mount namespaces; everything on the node enters it (pitfall 2).
    setsid nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation slave -- sh -c \
      "hostname node$i && mount --bind $MN/etc/hosts /etc/hosts && exec sleep infinity" </dev/null >/dev/null 2>&1 9>&- &
    echo $! > "$MN/run/node$i.anchor"; record anchor $!
    for _ in $(seq 1 50); do [ "$(nsenter -t $! -u hostname 2>/dev/null)" = "node$i" ] && break; sleep 0.05; done
  fi
done
echo "$NODES" > "$MN/run/nodes"
log "$NODES node namespaces up ($MN_NET.11..$((10 + NODES)) on $MN_BRIDGE)"

# ---- private munged --------------------------------------------------------------------------------------------
MSOCK=$MN/munge/munge.sock
if ! alive "$(cat "$MN/munge/munged.pid" 2>/dev/null)" munged; then
  runuser -u munge -- munged --socket="$MSOCK" --pid-file="$MN/munge/munged.pid" --log-file="$MN/munge/munged.log" \
    --seed-file="$MN/munge/munged.seed" --key-file=/etc/munge/munge.key 9>&-
  for _ in $(seq 1 50); do [ -s "$MN/munge/munged.pid" ] && break; sleep 0.05; done
  record munged "$(cat "$MN/munge/munged.pid")"
fi

# ---- slurm.conf + slurmdbd.conf ---------------------------------------------------------------------------------
NODE_LINES="" 
for i in $(seq 1 "$NODES"); do
  NODE_LINES+="NodeName=node$i NodeAddr=$MN_NET.$((10 + i)) CPUs=2 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=4000 State=UNKNOWN"$'\n'
done
cat > "$SLURM_CONF" <<CONF
# Written by cratescale cluster/dev/mn_up.sh: a $NODES-node dev cluster (one netns per node). Rerun the script.
ClusterName=mn
SlurmctldHost=${HOST}($MN_NET.1)
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort=$MN_CTLD_PORT
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=socket=$MSOCK,cred_expire=$CRED_EXPIRE
CredType=cred/munge
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$MN_DBD_PORT
AccountingStoragePass=$MSOCK
StateSaveLocation=$MN/state
SlurmdSpoolDir=$MN/spool/%n
SlurmctldPidFile=$MN/run/slurmctld.pid
SlurmdPidFile=$MN/run/slurmd-%n.pid
SlurmctldLogFile=$MN/log/slurmctld.log
SlurmdLogFile=$MN/log/slurmd-%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000,sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
KillWait=$KILL_WAIT
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=10
${NODE_LINES}PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME OverSubscribe=NO
PartitionName=high Nodes=node[1-$NODES] Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF OverSubscribe=NO
CONF
cat > "$MN/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$MSOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$MN_DBD_PORT
SlurmUser=slurm
DebugLevel=info
LogFile=$MN/log/slurmdbd.log
PidFile=$MN/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StorageLoc=slurm_acct_db
CONF
chown slurm:slurm "$MN/etc/slurmdbd.conf"; chmod 0600 "$MN/etc/slurmdbd.conf"

# ---- private MariaDB (socket only, no network) + slurmdbd ------------------------------------------------------
DB=$MN/mysql; DBSOCK=$DB/run/mysqld.sock
install -d -o mysql -g mysql "$DB" "$DB/run"
[ -d "$DB/data/mysql" ] || mariadb-install-db --no-defaults --user=mysql --datadir="$DB/data" \
  --auth-root-authentication-method=socket --skip-test-db >/dev/null
if ! alive "$(cat "$DB/run/mysqld.pid" 2>/dev/null)" mariadbd; then
  setsid mariadbd --no-defaults --user=mysql --datadir="$DB/data" --socket="$DBSOCK" --pid-file="$DB/run/mysqld.pid" \
    --skip-networking --log-error="$MN/log/mariadb.err" </dev/null >/dev/null 2>&1 9>&- &
  for _ in $(seq 1 150); do mariadb-admin --no-defaults --socket="$DBSOCK" ping >/dev/null 2>&1 && break; sleep 0.1; done
  for _ in $(seq 1 50); do [ -s "$DB/run/mysqld.pid" ] && break; sleep 0.1; done
  record mariadbd "$(cat "$DB/run/mysqld.pid")"
fi
mariadb --no-defaults --socket="$DBSOCK" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED VIA unix_socket;
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" || die "MariaDB under $DB does not answer"
if ! alive "$(cat "$MN/run/slurmdbd.pid" 2>/dev/null)" slurmdbd; then
  MYSQL_UNIX_PORT=$DBSOCK slurmdbd </dev/null >/dev/null 2>&1 9>&-   # pitfall 6: the socket comes from the env
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$MN_DBD_PORT") 2>/dev/null && break; sleep 0.1; done
  record slurmdbd "$(cat "$MN/run/slurmdbd.pid")"
fi
log "munged, mariadbd, slurmdbd up"

# ---- slurmctld first, then the slurmds (pitfall 7) -------------------------------------------------------------
if alive "$(cat "$MN/run/slurmctld.pid" 2>/dev/null)" slurmctld; then
  scontrol reconfigure
else
  slurmctld </dev/null >/dev/null 2>&1 9>&-
  for _ in $(seq 1 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done   # pitfall 8
  scontrol ping | grep -q UP || die "slurmctld did not come up (see $MN/log/slurmctld.log)"
  record slurmctld "$(cat "$MN/run/slurmctld.pid")"
fi
for i in $(seq 1 "$NODES"); do
  pidf=$MN/run/slurmd-node$i.pid
  alive "$(cat "$pidf" 2>/dev/null)" slurmd && continue
  install -d "$MN/spool/node$i"
  nsenter -t "$(mn_anchor "$i")" -n -u -m -- env SLURM_CONF="$SLURM_CONF" slurmd -N "node$i" </dev/null >/dev/null 2>&1 9>&-
  for _ in $(seq 1 100); do [ -s "$pidf" ] && break; sleep 0.05; done
  record slurmd "$(cat "$pidf")"
done
for _ in $(seq 1 200); do
  idle=$(sinfo -h -p debug -t idle,mixed,allocated -o %D 2>/dev/null | awk '{s += $1} END {print s + 0}')
  [ "$idle" -ge "$NODES" ] && break; sleep 0.2
done
[ "$idle" -ge "$NODES" ] || { sinfo -N >&2; tail -n 20 "$MN/log/slurmctld.log" >&2; die "only $idle of $NODES nodes up"; }
sinfo -N -p debug -o "%N %T %o %n"
log "cluster up: $NODES nodes; export SLURM_CONF=$SLURM_CONF"
