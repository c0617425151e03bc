"""Kill-loop soak: SIGKILL a real 2-rank training (gloo, ZeRO-2, tiny CRATE-MAE, DALI CPU + bf16 as the jobs run
by default, a commit every step with keep_last=1) N times at random moments, restart it each time, then compare
it bitwise with an uninterrupted run.

    .venv/bin/python -m bench.soak [--kills 200] [--seed 0] [--root DIR] [--loader dali|pil] [--precision bf16|fp32]

Kill moments (seeded, cycled evenly): start-up, mid-step, the instant step_N.tmp appears, and planted points
of the commit protocol (COMMITTED written but not renamed, renamed but pointer not moved, mid-retention
delete, mid pointer swap, inside the asynchronous commit's background write while the next step trains);
see tests/faults/killloop.py. After every kill the store is read like a reader
would: latest() loads and verifies, never goes back, every commit verifies, `latest` names a valid commit.
Ranks are forked from a pre-imported server (tests/faults/ranks.py), so a restart costs the rendezvous and
DeepSpeed init (~1 s), not the imports; the reference run uses the same server, from scratch.
Prints a progress line every 10 kills and a table; exits 1 when anything did not hold.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from tests.dist.harness import assert_same_tree, final_weights, optimizer_files, write_config
from tests.faults.killloop import MODES, leftovers, read_sample_log, run_kill_loop
from tests.faults.ranks import RankServer

TINY_JOB = REPO / "tests" / "dist" / "tiny.yaml"


def bitwise_equal(a: Path, b: Path) -> bool:
    try:
        step_a, weights_a = final_weights(a)
        step_b, weights_b = final_weights(b)
        assert step_a == step_b
        assert_same_tree(weights_a, weights_b)
        assert_same_tree(optimizer_files(a), optimizer_files(b))
        return True
    except AssertionError as err:
        print(f"NOT EQUAL: {err}")
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default=None, help="work directory (default: a fresh temp dir, removed after)")
    # The jobs' production settings by default (issue 13): DALI (CPU here) and bf16; pil/fp32 for comparison.
    ap.add_argument("--loader", choices=["dali", "pil"], default="dali")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    args = ap.parse_args(argv)
    root = Path(args.root or tempfile.mkdtemp(prefix="cratescale-soak-"))
    # About 1.5 steps of progress per kill; three times that leaves the kills room, the rest trains uninterrupted.
    steps = 3 * args.kills + 20
    overrides = ["checkpoint.every_steps=1", "checkpoint.keep_last=1", f"schedule.steps={steps}",
                 "logging.every_steps=10", f"data.loader={args.loader}", f"parallel.precision={args.precision}"]
    print(f"soak: {args.kills} kills, {steps} steps, loader {args.loader}, precision {args.precision}", flush=True)
    from data_pipeline.ingest import ingest

    manifest = Path(ingest("synthetic://shapes?n=192&classes=4&size=32&seed=1", root / "data", workers=0,
                           progress=False))
    t0 = time.monotonic()
    with RankServer() as server:
        ref_dir = root / "reference"
        job = server.start(write_config(TINY_JOB, ref_dir, overrides), manifest, 2)
        assert job.wait(timeout=3600) == [0, 0], job.output(0)
        t_ref = time.monotonic() - t0
        print(f"reference: {steps} steps uninterrupted in {t_ref:.0f} s", flush=True)
        run_dir = root / "killed"
        report = run_kill_loop(server, write_config(TINY_JOB, run_dir, overrides), manifest, run_dir, steps,
                               args.kills, seed=args.seed, log=lambda line: print(line, flush=True), every=10)
    equal = report.completed_step == steps and bitwise_equal(ref_dir, run_dir)
    samples_equal = read_sample_log(run_dir)[0] == read_sample_log(ref_dir)[0]
    left = leftovers(run_dir / "checkpoints", steps)
    rows = [("kills", args.kills, report.kills, "== --kills"),
            ("restarts", "", report.restarts, "kills + 1"),
            ("kills mid-save (step_N.tmp left)", "", report.during_write, "> 0"),
            ("store checks after kills", "", report.checks, "== kills + 1"),
            ("unreadable / unverifiable commits", 0, len(report.problems), "0"),
            ("final weights + optimizer bitwise equal", "yes", "yes" if equal else "NO", "yes"),
            ("per-step sample ids equal", "yes", "yes" if samples_equal else "NO", "yes"),
            ("leftover files in checkpoints/", 0, len(left), "0"),
            ("steps trained again after kills", "", report.steps_redone, "<= 2 x kills (async commit)"),
            ("wall time (s), reference run", "", f"{t_ref:.0f}", ""),
            ("wall time (s), kill loop", "", f"{report.seconds:.0f}", "")]
    print(f"\nsoak: {report.kills} kills by kind {dict(sorted(report.by_mode.items()))} (kinds: {len(MODES)})")
    print(f"{'':42s} {'baseline':>9s} {'measured':>9s}  target")
    for name, base, got, target in rows:
        print(f"{name:42s} {base!s:>9s} {got!s:>9s}  {target}")
    for problem in report.problems[:20]:
        print("PROBLEM:", problem)
    for name in left:
        print("LEFTOVER:", name)
    ok = report.kills == args.kills and not report.problems and equal and samples_equal and not left \
        and report.steps_redone <= 2 * report.kills
    print(f"\nRESULT kills={report.kills} restarts={report.restarts} bitwise_equal={equal} "
          f"unreadable_commits={len(report.problems)} leftovers={len(left)} -> {'PASS' if ok else 'FAIL'}")
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
