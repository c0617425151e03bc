"""python -m cratescale.launch JOB.yaml [key=value ...] [--dry-run | --print-config | --detach] [--stages a,b]
   python -m cratescale.launch attach RUN_DIR      follow a run's live job (submits nothing), then its later stages
   python -m cratescale.launch config [JOB.yaml [key=value ...]] [--markdown]   every field, its default, doc
   python -m cratescale.launch status RUN_DIR [--json]      stages, failures, headline results, the report
   python -m cratescale.launch runs [DIR] [--json]          every run under DIR (default runs/) with its state

A launch of a run whose job is still queued or running follows that job instead of submitting another.

Options and key=value overrides may come in any order."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cratescale.config import ConfigError
from cratescale.launch.run import launch
from cratescale.launch.status import show_runs, show_status


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"cratescale {version('cratescale')}"
    except PackageNotFoundError:  # a checkout run without `pip install -e .`
        return "cratescale (not installed: run from a checkout)"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cratescale.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", help="job YAML, or 'config' / 'status' / 'runs' followed by their arguments")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides (or the run directory for status)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; start nothing")
    parser.add_argument("--print-config", action="store_true", help="print the resolved job as YAML; start nothing")
    parser.add_argument("--stages", help="comma-separated subset of the job's stages to run")
    parser.add_argument("--detach", action="store_true",
                        help="return once the training job is submitted (or found running); attach later")
    parser.add_argument("--json", action="store_true", help="status: print JSON for scripts instead of a table")
    parser.add_argument("--markdown", action="store_true", help="config: print docs/config.md")
    parser.add_argument("--version", action="version", version=_version())
    return parser.parse_intermixed_args(argv)


def show_config(args: argparse.Namespace) -> int:
    from cratescale.config import load_job
    from cratescale.config.reference import render_markdown, render_text, rows_for_job

    job = load_job(args.overrides[0], args.overrides[1:]) if args.overrides else None
    rows = rows_for_job(job)
    print(render_markdown(rows) if args.markdown else render_text(rows), end="" if args.markdown else "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a log file (sbatch output) gets each line at once, also before a kill
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        if args.job == "status":
            if len(args.overrides) != 1:
                raise ConfigError("status: give exactly one run directory")
            return show_status(args.overrides[0], as_json=args.json)
        if args.job == "runs":
            if len(args.overrides) > 1:
                raise ConfigError("runs: give at most one directory")
            return show_runs(*args.overrides, as_json=args.json)
        if args.job == "config":
            return show_config(args)
        if args.job == "attach":
            if len(args.overrides) != 1 or not (Path(args.overrides[0]) / "config.yaml").is_file():
                raise ConfigError(f"attach: give one run directory (one with a config.yaml), got {args.overrides}")
            return launch(str(Path(args.overrides[0]) / "config.yaml"), [], stages=args.stages, detach=args.detach)
        return launch(args.job, args.overrides, dry_run=args.dry_run, stages=args.stages,
                      print_config=args.print_config, detach=args.detach)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
