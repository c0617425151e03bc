"""One measurement of bench/scale.py, run in a fresh process so its start-up and peak RSS are its own:

    python bench/scale_points.py WHAT --manifest DIR [--world W] [--global-batch B] [--store DIR] [--tree DIR]

Prints one JSON object: startup_s (the measured call, imports excluded), import_s, rss_imports_mb (RSS after the
imports, before the call), peak_rss_mb (the process's peak, imports included), data_rss_mb = the call's own peak
RSS - rss_imports (what the data costs this process at its worst), rss_after_mb (what it keeps) and how the
call's growth splits: data_file_mb (mapped file pages: the page cache's, shared by every process that maps them)
and data_anon_mb (the process's own), plus what the point adds. WHAT:
  rank      what a training rank does before step 0 with the data: count_train_samples, then the train split's
            arrays, the epoch's permutation and its first step's sample ids and augmentation (SampleFeed, W ranks)
  worker    what a loader worker does: unpickles the rank's SampleFeed, then the same first step's sample ids
  count     count_train_samples (launcher, plan, trainer)
  sampler   the epoch permutation of N positions and one step's rank slice at W
  fingerprint  content_fingerprint over the whole table (what write_manifest and an unrecorded manifest pay)
  index_build  the shared index (data_pipeline/manifest_index.py) from the Parquet file, as the first process of
            a node does when the ingest did not leave one (its old copy removed first)
  resume    plan_resume over the checkpoint store at --store (its commits verified newest first)
  ingest_plan  plan_source over the folder tree at --tree
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import sys
import time
from pathlib import Path

# SCALE_CODE: the tree whose data_pipeline and cratescale are measured (bench/scale.py --code: "before" numbers).
sys.path.insert(0, os.environ.get("SCALE_CODE") or str(Path(__file__).resolve().parents[1]))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _reset_hwm() -> None:
    # "5" resets the kernel's peak RSS (VmHWM) to the current RSS, so the call's own peak is not hidden under a
    # larger one of the imports (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_mb(field: str) -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _pss_mb() -> float:
    line = next(x for x in Path("/proc/self/smaps_rollup").read_text().splitlines() if x.startswith("Pss:"))
    return int(line.split()[1]) / 1024


def _hwm_mb() -> float:
    # Not ru_maxrss: Linux carries it over exec, so a child would report its parent's peak.
    return _status_mb("VmHWM")


def _feed(manifest: Path, world: int, batch: int):
    from data_pipeline.feed import SampleFeed
    return SampleFeed(str(manifest / "manifest.parquet"), mode="train", seed=0, split="train", global_batch=batch,
                      rank=world - 1, world_size=world, start_step=0, num_patches=196)


def _first_ids(feed) -> dict:
    rows = [feed.row(j) for j in range(feed.per_rank)]
    ids = feed.manifest.sample_id[rows]
    return {"first_ids": [int(i) for i in ids[:4]], "train_rows": int(len(feed.manifest.rows))}


def measure(what: str, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    manifest = Path(args.manifest) / "manifest.parquet" if args.manifest else None
    if what == "rank":
        from cratescale.engine.model_build import count_train_samples
        feed = _feed(Path(args.manifest), args.world, args.global_batch)
    elif what == "worker":
        feed = pickle.loads(pickle.dumps(_feed(Path(args.manifest), args.world, args.global_batch)))
    elif what == "count":
        from cratescale.engine.model_build import count_train_samples
    elif what == "sampler":
        import pyarrow.parquet as pq

        from data_pipeline.sampler import GlobalSampler
        n = pq.ParquetFile(manifest).metadata.num_rows
    elif what == "fingerprint":
        from data_pipeline.manifest import content_fingerprint, read_manifest
    elif what == "index_build":
        import shutil

        from data_pipeline.manifest_index import INDEX_DIR, build_index
        shutil.rmtree(manifest.parent / INDEX_DIR, ignore_errors=True)
    elif what == "resume":
        from cratescale.checkpoint.commit import CheckpointStore
        from cratescale.config.identity import IDENTITY_VERSION
        from cratescale.engine.state import plan_resume
        from data_pipeline.manifest import manifest_fingerprint
        identity = {"version": IDENTITY_VERSION, "manifest": manifest_fingerprint(manifest), "fields": {}}
    elif what == "ingest_plan":
        from data_pipeline.sources import plan_source
    else:
        raise SystemExit(f"scale_points.py: unknown point {what!r}")
    import_s, rss_imports, peak_imports = time.perf_counter() - t0, _rss_mb(), _hwm_mb()
    file_imports, anon_imports = _status_mb("RssFile"), _status_mb("RssAnon")
    _reset_hwm()
    out: dict = {}
    t = time.perf_counter()
    if what == "rank":
        out["count"] = count_train_samples(manifest)
        out.update(_first_ids(feed))
    elif what == "worker":
        out.update(_first_ids(feed))
    elif what == "count":
        out["count"] = count_train_samples(manifest)
    elif what == "sampler":
        sampler = GlobalSampler(n, 0, args.global_batch)
        sampler.permutation(0)
        out["permutation_s"] = round(time.perf_counter() - t, 4)
        s = time.perf_counter()
        out["first_ids"] = [int(i) for i in sampler.rank_slice(0, sampler.steps_per_epoch - 1, args.world - 1,
                                                                 args.world)[:4]]
        out["slice_s"] = round(time.perf_counter() - s, 6)
    elif what == "fingerprint":
        out["fingerprint"] = content_fingerprint(read_manifest(manifest))
    elif what == "index_build":
        folder = build_index(manifest)
        out["index_mb"] = round(sum(f.stat().st_size for f in folder.iterdir()) / 2**20, 1)
    elif what == "resume":
        store = CheckpointStore(args.store, keep_last=10_000)
        plan = plan_resume(store, identity, 4096, args.world)
        out.update(commits=len(store.newest_first()), step=plan.commit.step)
    elif what == "ingest_plan":
        plan = plan_source(str(Path(args.tree) / "train"), None, 4096)
        out.update(files=sum(u.count for u in plan.units), units=len(plan.units))
    startup = time.perf_counter() - t
    if args.hold:  # --hold: stay alive so that processes started together are measured together (PSS splits
        time.sleep(args.hold)  # a shared page between the processes mapping it)
        out["pss_mb"] = round(_pss_mb(), 1)
    return {"startup_s": round(startup, 4), "import_s": round(import_s, 3), "rss_imports_mb": round(rss_imports, 1),
            "peak_rss_mb": round(max(peak_imports, _hwm_mb()), 1), "data_rss_mb": round(_hwm_mb() - rss_imports, 1),
            "rss_after_mb": round(_rss_mb(), 1), "data_file_mb": round(_status_mb("RssFile") - file_imports, 1),
            "data_anon_mb": round(_status_mb("RssAnon") - anon_imports, 1), **out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what")
    ap.add_argument("--manifest", default=None)
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--global-batch", type=int, default=4096)
    ap.add_argument("--store", default=None)
    ap.add_argument("--tree", default=None)
    ap.add_argument("--hold", type=float, default=0.0)
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.what, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
