#!/usr/bin/env bash
# Kill node N of the multi-node dev cluster as a power loss would: SIGKILL every process in its network
# namespace (slurmd, job steps, ranks, Ray) except the anchor that keeps the namespace. With --down, also tell
# slurmctld at once (State=DOWN): SLURM itself needs ~25 s to notice (SLURM_MULTINODE.md pitfall 14).
# Bring the node back with `bash cluster/dev/mn_up.sh` (restarts only dead daemons; ReturnToService=2).
set -euo pipefail
. "$(dirname "$0")/mn_env.sh"
[ $# -ge 1 ] || { echo "usage: node_kill.sh N [--down]" >&2; exit 2; }
n=$1; anchor=$(mn_anchor "$n")
[ -n "$anchor" ] || { echo "node_kill.sh: node$n is not up" >&2; exit 1; }
killed=""
for pid in $(ip netns pids "$(mn_netns "$n")"); do
  [ "$pid" = "$anchor" ] && continue
  kill -KILL "$pid" 2>/dev/null && killed="$killed $pid"
done
for _ in $(seq 1 50); do  # until they are gone (zombies included), so a restart right after sees them dead
  left=""; for pid in $killed; do [ -d "/proc/$pid" ] && left=1; done; [ -z "$left" ] && break; sleep 0.1
done
echo "node$n: killed${killed:- nothing}"
if [ "${2:-}" = --down ]; then
  scontrol update NodeName="node$n" State=DOWN Reason=node_kill.sh
  echo "node$n: set DOWN"
fi
