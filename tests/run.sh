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
cleanup() { [ "$started_slurm" = 1 ] && bash cluster/dev/slurm_down.sh >/dev/null 2>&1; }
trap cleanup EXIT
$PY -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
rc=$?
[ "$rc" = 5 ] && { echo "pytest collected no tests: failing" >&2; exit 1; }
exit $rc
