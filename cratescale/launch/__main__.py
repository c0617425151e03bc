"""python -m cratescale.launch JOB.yaml [key=value ...] [--dry-run]  |  ... status RUN_DIR [--json]"""
from __future__ import annotations

import argparse
import sys

from cratescale.config import ConfigError
from cratescale.launch.run import launch
from cratescale.launch.status import show_status


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cratescale.launch", description=__doc__)
    parser.add_argument("job", help="job YAML, or 'status' followed by a run directory")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides (or the run directory for status)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; start nothing")
    parser.add_argument("--stages", help="comma-separated subset of the job's stages to run")
    parser.add_argument("--json", action="store_true", help="status: print JSON for scripts instead of a table")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        if args.job == "status":
            if len(args.overrides) != 1:
                raise ConfigError("status: give exactly one run directory")
            return show_status(args.overrides[0], as_json=args.json)
        return launch(args.job, args.overrides, dry_run=args.dry_run, stages=args.stages)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
