#!/usr/bin/env bash
# The test suite: unit + 2-process + SLURM tiers. Starts the local SLURM cluster if it is not up and stops
# it again when this script started it. pytest's "no tests collected" (exit 5) fails the run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
started_slurm=0
if ! scontrol ping >/dev/null 2>&1; then
  if bash cluster/dev/slurm_up.sh; then started_slurm=1; else echo "SLURM cluster failed to start" >&2; exit 1; fi
fi
# The multinode tier starts the N-node cluster (cluster/dev/mn_up.sh) itself and stops it at its end; if pytest
# is killed first, it is stopped here, unless it was already up before this run.
mn_was_up=0
[ -d /var/lib/cratescale-slurm-mn/run ] && [ -s /var/lib/cratescale-slurm-mn/run/pids ] && mn_was_up=1
cleanup() {
  [ "$mn_was_up" = 0 ] && [ -s /var/lib/cratescale-slurm-mn/run/pids ] && bash cluster/dev/mn_down.sh >/dev/null 2>&1
  [ "$started_slurm" = 1 ] && bash cluster/dev/slurm_down.sh >/dev/null 2>&1
}
trap cleanup EXIT
$PY -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
rc=$?
[ "$rc" = 5 ] && { echo "pytest collected no tests: failing" >&2; exit 1; }
exit $rc
