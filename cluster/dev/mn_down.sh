#!/usr/bin/env bash
# Stop the multi-node dev cluster of mn_up.sh, by pid only (never by name: the single-node cluster and other
# Ray/SLURM processes on this machine are left alone). A pid is signalled only while /proc/PID/comm still names
# what was started. Then everything left in a node's namespace (anchor, Ray, orphaned steps) is killed, the
# namespaces and the bridge are deleted. State ($MN/state, the MariaDB datadir) is kept: job ids keep counting.
set -uo pipefail
. "$(dirname "$0")/mn_env.sh"
T_START=$(date +%s%N)
log() { echo "[mn_down +$(( ($(date +%s%N) - T_START) / 1000000 ))ms] $*"; }
[ -d "$MN/run" ] || { log "nothing to stop ($MN/run missing)"; exit 0; }

pids_of() {  # live recorded pids of daemon $1
  local pid
  for pid in $(awk -v n="$1" '$1 == n {print $2}' "$MN/run/pids" 2>/dev/null | sort -u); do
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] && echo "$pid"
  done
}
stop_stage() {
  local name pid pids="" left=""
  for name in "$@"; do for pid in $(pids_of "$name"); do kill -TERM "$pid" 2>/dev/null && pids="$pids $pid"; done; done
  [ -n "$pids" ] || return 0
  for _ in $(seq 1 100); do
    left=""; for pid in $pids; do kill -0 "$pid" 2>/dev/null && left="$left $pid"; done
    [ -z "$left" ] && break; sleep 0.1
  done
  for pid in $left; do kill -KILL "$pid" 2>/dev/null; done
  log "stopped $*:$pids"
}
if [ "${CANCEL_JOBS:-1}" = 1 ] && timeout 5 scontrol ping 2>/dev/null | grep -q UP; then
  jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    scancel $jobs 2>/dev/null
    for _ in $(seq 1 100); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.1; done
    log "cancelled jobs: $jobs"
  fi
fi
stop_stage slurmd slurmctld
stop_stage slurmdbd mariadbd munged
for i in $(seq 1 "$(mn_nodes)"); do   # anchors, Ray, leftover steps: every process in the node's netns is ours
  ns=$(mn_netns "$i")
  ip netns list | grep -qw "$ns" || continue
  for pid in $(ip netns pids "$ns"); do kill -KILL "$pid" 2>/dev/null; done
  for _ in $(seq 1 50); do [ -z "$(ip netns pids "$ns")" ] && break; sleep 0.1; done
  ip netns del "$ns"
done
ip link show "$MN_BRIDGE" >/dev/null 2>&1 && ip link del "$MN_BRIDGE"
rm -f "$MN/run/pids" "$MN/run/"node*.anchor
log "multi-node cluster down"
