"""What grows with the data and the world, measured before a cluster pays for it (issue 31).

    OMP_NUM_THREADS=1 .venv/bin/python bench/scale.py --rows 100000 1000000 14197122 [--work DIR] [--label after]
        [--worlds 8 64 512] [--global-batch 4096] [--commits 140] [--tree-files 10000 100000] [--node-procs 8]
        [--code DIR] [--out bench/results/scale.jsonl]
    .venv/bin/python bench/scale.py --plot-only      # redraw bench/results/scale.png from the JSONL

The "before" numbers in BENCHMARKS.md: `git archive 07ab385 | tar -x -C /tmp/before` (the commit before the shared
index), then the same command with `--code /tmp/before --label before`.

For each row count: a synthetic manifest shaped like the resharded ImageNet-21k ingest (bench/scale_data.py,
written with data_pipeline's own `write_manifest`, built once under --work and reused), then one fresh process
per point (bench/scale_points.py), one at a time, so each start-up and each peak RSS is that process's own:
a rank's data start-up and a loader worker's at each W, count_train_samples, the sampler's permutation and
slice at each W, the content fingerprint; once, the resume plan over --commits commits, and the ingest plan of
folder trees of --tree-files files, and --node-procs loader workers started together (their summed PSS: what a
node pays; after the index only: before it each took 4 GB). Prints one JSON line per point ({"rows", "what",
"process", "label", "startup_s", "peak_rss_mb", ...}), appends them to --out (replacing earlier lines of the same
label, rows, what and world) and draws cost vs rows, log-log, to --png (one panel for seconds, one for data RSS; dashed
lines are the "before" label).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.record import cpu_model, load_average  # noqa: E402
from bench.scale_data import build_manifest, build_store, build_tree  # noqa: E402

CODE: str | None = None  # --code: measure another tree's data_pipeline and cratescale (e.g. main's, for "before")
PROCESS = {"rank": "rank", "worker": "loader worker", "count": "launcher", "sampler": "rank",
           "fingerprint": "ingest / launcher", "index_build": "first on a node",
           "resume": "rank 0", "ingest_plan": "ingest driver"}


def _machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, load {load_average()}"


def point(what: str, rows: int | None, label: str, timeout: float = 900, **kw) -> dict:
    """Runs one scale_points.py process and returns its record (an error record when it fails)."""
    cmd = [sys.executable, str(REPO / "bench" / "scale_points.py"), what]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    code = CODE or str(REPO)
    env = {**os.environ, "PYTHONPATH": code, "SCALE_CODE": code, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    record = {"rows": rows, "what": what, "process": PROCESS[what], "label": label, "world": kw.get("world"),
              "wall_s": round(time.perf_counter() - t, 2), "machine": _machine()}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {**record, "error": f"exit {proc.returncode}: {tail}"}
    return {**record, **json.loads(proc.stdout.strip().splitlines()[-1])}


def run_rows(rows: int, args: argparse.Namespace) -> list[dict]:
    work = Path(args.work) / f"rows_{rows}"
    built = build_manifest(rows, work)
    print(json.dumps({"rows": rows, "what": "build_manifest", **built}), flush=True)
    records = []
    if (Path(CODE or REPO) / "data_pipeline" / "manifest_index.py").exists():  # first: the points below map it
        records.append(point("index_build", rows, args.label, manifest=work))
        print(json.dumps(records[-1]), flush=True)
    for world in args.worlds:
        for what in ("rank", "worker", "sampler"):
            records.append(point(what, rows, args.label, manifest=work, world=world, global_batch=args.global_batch))
            print(json.dumps(records[-1]), flush=True)
    for what in ("count", "fingerprint"):
        records.append(point(what, rows, args.label, manifest=work))
        print(json.dumps(records[-1]), flush=True)
    return records


def run_once(args: argparse.Namespace, manifest_rows: int) -> list[dict]:
    """Points that grow with something other than the manifest: commits, files of a tree."""
    records = []
    if args.commits:
        from data_pipeline.manifest import manifest_fingerprint
        manifest = Path(args.work) / f"rows_{manifest_rows}"
        fingerprint = manifest_fingerprint(manifest / "manifest.parquet")
        store = Path(args.work) / f"store_{args.commits}_{fingerprint}"
        build_store(store, args.commits, fingerprint)
        records.append({**point("resume", manifest_rows, args.label, manifest=manifest, store=store),
                        "commits": args.commits})
        print(json.dumps(records[-1]), flush=True)
    for files in args.tree_files:
        tree = Path(args.work) / f"tree_{files}"
        build_tree(tree, files)
        records.append(point("ingest_plan", files, args.label, tree=tree))
        print(json.dumps(records[-1]), flush=True)
    return records


def node(rows: int, procs: int, args: argparse.Namespace) -> dict:
    """`procs` loader workers of one node started together on the same manifest (memory: after the index only):
    the sum of their PSS is what the node pays, the sum of their RSS what it would pay if nothing were shared."""
    work = Path(args.work) / f"rows_{rows}"
    code = CODE or str(REPO)
    env = {**os.environ, "PYTHONPATH": code, "SCALE_CODE": code, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "bench" / "scale_points.py"), "worker", "--manifest", str(work),
           "--hold", str(args.hold), "--global-batch", str(args.global_batch)]
    children = [subprocess.Popen(cmd + ["--world", "8"], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
                for _ in range(procs)]
    texts = [c.communicate(timeout=600)[0].strip().splitlines() for c in children]
    if any(c.returncode != 0 for c in children):
        raise SystemExit(f"scale.py: a worker of the node measurement failed (exit codes "
                         f"{[c.returncode for c in children]})")
    outs = [json.loads(text[-1]) for text in texts]
    return {"rows": rows, "what": "node_workers", "process": f"{procs} loader workers at once", "label": args.label,
            "world": None, "procs": procs, "machine": _machine(),
            "startup_s": max(o["startup_s"] for o in outs), "data_rss_mb": max(o["data_rss_mb"] for o in outs),
            "peak_rss_mb": max(o["peak_rss_mb"] for o in outs), "sum_rss_mb": round(sum(o["rss_after_mb"] for o in outs), 1),
            "sum_pss_mb": round(sum(o["pss_mb"] for o in outs), 1),
            "sum_data_rss_mb": round(sum(o["data_rss_mb"] for o in outs), 1)}


def _key(r: dict) -> tuple:
    return r.get("label"), r.get("rows"), r.get("what"), r.get("world")


def save(records: list[dict], out: Path) -> list[dict]:
    """Appends `records` to the JSONL at `out`, dropping earlier lines they replace; returns all lines."""
    new = {_key(r) for r in records}
    old = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    kept = [r for r in old if _key(r) not in new] + records
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def plot(records: list[dict], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_m) = plt.subplots(1, 2, figsize=(13, 5.2))
    series: dict[tuple, list[tuple[int, float, float]]] = {}
    for r in records:
        if "error" in r or r["what"] in ("resume", "node_workers") or (r.get("world") not in (None, 8)):
            continue
        series.setdefault((r["label"], r["what"]), []).append((r["rows"], r["startup_s"], r["data_rss_mb"]))
    colours = {}
    for (label, what), pts in sorted(series.items()):
        pts.sort()
        colour = colours.setdefault(what, f"C{len(colours)}")
        style = "--" if label == "before" else "-"
        xs = [p[0] for p in pts]
        ax_s.plot(xs, [max(p[1], 1e-4) for p in pts], style, marker="o", color=colour, label=f"{what} ({label})")
        ax_m.plot(xs, [max(p[2], 0.1) for p in pts], style, marker="o", color=colour, label=f"{what} ({label})")
    for ax, title, target in ((ax_s, "seconds (the call, imports excluded)", 3.0),
                              (ax_m, "data RSS MB (peak - after imports)", 400.0)):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(target, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("manifest rows (ingest_plan: files)")
        ax.set_title(title + f"; dotted: target {target:g}")
        ax.grid(True, which="both", lw=0.3)
    ax_m.legend(fontsize=7, ncol=2)
    fig.suptitle("bench/scale.py: cost vs size (W=8 for rank/worker/sampler; dashed = before the shared index)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[100_000, 1_000_000, 14_197_122])
    ap.add_argument("--worlds", type=int, nargs="*", default=[8, 64, 512])
    ap.add_argument("--global-batch", type=int, default=4096, help="jobs/imagenet21k.yaml's")
    ap.add_argument("--commits", type=int, default=140)
    ap.add_argument("--tree-files", type=int, nargs="*", default=[])
    ap.add_argument("--label", default="after")
    ap.add_argument("--work", default="/tmp/cratescale_scale")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.jsonl"))
    ap.add_argument("--png", default=str(REPO / "bench" / "results" / "scale.png"))
    ap.add_argument("--code", default=None, help="a tree whose code is measured (default: this one), e.g. "
                    "`git archive main | tar -x -C DIR` for the before numbers")
    ap.add_argument("--node-procs", type=int, default=0, help="also start this many loader workers at once at "
                    "the largest --rows (their summed PSS: what one node pays)")
    ap.add_argument("--hold", type=float, default=20.0, help="seconds the --node-procs workers stay up together")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args(argv)
    global CODE
    CODE = args.code and os.path.abspath(args.code)
    out = Path(args.out)
    if not args.plot_only:
        records = [r for rows in args.rows for r in run_rows(rows, args)]
        if args.rows:
            records += run_once(args, max(args.rows))
        if args.node_procs:
            records.append(node(max(args.rows), args.node_procs, args))
            print(json.dumps(records[-1]), flush=True)
        save(records, out)
    all_records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    plot(all_records, Path(args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
