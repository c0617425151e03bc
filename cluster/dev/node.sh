#!/usr/bin/env bash
# Run a command on node N of the multi-node dev cluster: inside its network, UTS and mount namespaces
# (hostname nodeN, its own IP, the cluster's hosts file). The cwd is kept (nsenter -m would reset it to /).
#   bash cluster/dev/node.sh 2 hostname          ->  node2
#   bash cluster/dev/node.sh 1 ip -br addr       ->  lo, eth0 10.77.0.11/24
set -euo pipefail
. "$(dirname "$0")/mn_env.sh"
[ $# -ge 2 ] || { echo "usage: node.sh N CMD [ARGS...]" >&2; exit 2; }
n=$1; shift
pid=$(mn_anchor "$n")
[ -n "$pid" ] && [ -d "/proc/$pid" ] || { echo "node.sh: node$n is not up (no anchor under $MN/run)" >&2; exit 1; }
exec nsenter -t "$pid" -n -u -m -- env -C "$PWD" "$@"
