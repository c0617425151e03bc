# Shared settings of the multi-node dev cluster (sourced by mn_up.sh, mn_down.sh, node.sh, node_kill.sh).
# Every node is a network + UTS + mount namespace on this machine (shared/reference/SLURM_MULTINODE.md).
# Everything lives under $MN: nothing of the single-node cluster (/etc/slurm, /run/munge, /var/lib/mysql,
# ports 6817/6819) is touched, so both can run side by side.
MN=${MN:-/var/lib/cratescale-slurm-mn}
MN_NET=${MN_NET:-10.77.0}            # bridge .1, nodeN .(10+N); /24, no default route in a node
MN_BRIDGE=${MN_BRIDGE:-csmnbr0}
MN_CTLD_PORT=${MN_CTLD_PORT:-6917}
MN_DBD_PORT=${MN_DBD_PORT:-6919}
export SLURM_CONF=$MN/etc/slurm.conf
mn_anchor() { cat "$MN/run/node$1.anchor" 2>/dev/null; }   # pid holding node $1's namespaces
mn_netns() { echo "csmn-node$1"; }
mn_nodes() { cat "$MN/run/nodes" 2>/dev/null || echo 0; }  # how many nodes the last mn_up.sh configured
