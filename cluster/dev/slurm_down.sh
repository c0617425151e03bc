#!/usr/bin/env bash
# Stop the dev SLURM cluster started by slurm_up.sh. Stops daemons by PID only (their pid files and the pids
# slurm_up.sh recorded in /run/cratescale-slurm/pids), never by name: no pkill/killall. A pid is signalled only
# if /proc/<pid>/comm still names the expected daemon, so a stale pid file cannot hit an unrelated process.
#   CANCEL_JOBS=1 (default): scancel the cluster's jobs first, so no job steps outlive slurmd.
set -uo pipefail
CANCEL_JOBS=${CANCEL_JOBS:-1}
PIDS_FILE=/run/cratescale-slurm/pids
T_START=$(date +%s%N)
log() { echo "[slurm_down +$(( ($(date +%s%N) - T_START) / 1000000 ))ms] $*"; }

declare -A PIDFILE=([slurmd]=/run/slurm/slurmd.pid [slurmctld]=/run/slurm/slurmctld.pid
                    [slurmdbd]=/run/slurm/slurmdbd.pid [mariadbd]=/run/mysqld/mysqld.pid
                    [munged]=/run/munge/munged.pid)

pids_of() {  # $1 = daemon name -> live pids (from its pid file and the record) whose comm is that name
  local cands="" pid
  [ -s "${PIDFILE[$1]}" ] && cands=$(cat "${PIDFILE[$1]}")
  [ -s "$PIDS_FILE" ] && cands="$cands $(awk -v n="$1" '$1 == n {print $2}' "$PIDS_FILE")"
  for pid in $(tr ' ' '\n' <<<"$cands" | sort -u); do
    [[ "$pid" =~ ^[0-9]+$ ]] || continue
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] && echo "$pid"
  done
}

stop_stage() {  # TERM the named daemons together, wait up to 10 s, then KILL what is left
  local name pid pids="" left
  for name in "$@"; do
    for pid in $(pids_of "$name"); do kill -TERM "$pid" 2>/dev/null && pids="$pids $pid:$name"; done
  done
  [ -n "$pids" ] || return 0
  for _ in $(seq 1 100); do
    left=""
    for p in $pids; do kill -0 "${p%%:*}" 2>/dev/null && left="$left $p"; done
    [ -z "$left" ] && break
    sleep 0.1
  done
  for p in $left; do echo "${p##*:} (${p%%:*}) still alive after 10 s: SIGKILL"; kill -KILL "${p%%:*}" 2>/dev/null; done
  log "stopped$pids"
}

if [ "$CANCEL_JOBS" = 1 ] && scontrol ping >/dev/null 2>&1; then
  jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    scancel $jobs 2>/dev/null
    for _ in $(seq 1 150); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.1; done
    log "cancelled jobs: $jobs"
  fi
fi
stop_stage slurmd slurmctld       # slurmctld's child slurmscriptd exits with it
stop_stage slurmdbd mariadbd munged   # none needs the others to shut down
for name in "${!PIDFILE[@]}"; do
  [ -n "$(pids_of "$name")" ] && { echo "slurm_down: $name still running" >&2; exit 1; }
done
rm -f "$PIDS_FILE"
log "cluster down"
