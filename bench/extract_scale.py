"""Extraction of a manifest-sized pretraining set inside its memory prediction (issue 31.4).

    .venv/bin/python -m bench.extract_scale --rows 1000000 [--actors 2] [--batch 256] [--json PATH]

A synthetic manifest shaped like the resharded ImageNet-21k ingest (bench/scale_data.py: shards, classes, keys
and splits in the real set's proportions) whose rows point, in turn, at the members of a few real tar shards of
small JPEGs (synthetic://shapes, 16 px), so every row decodes. crate_mae_debug at 32 px, exported; the extraction
runs as the product runs it (`run_extraction`: local Ray, actors sized by the memory plan, DALI on the CPU), with
the pretraining set's default split (None: every row). Each actor follows its own footprint (its RSS plus its
loader workers' private pages, memory.RssGuard) and reports the peak with each shard; the row per actor is that
peak over the prediction Ray reserved for it. Target, written before measuring: measured / predicted in 0.75-1.25
for every actor.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench.record import Run, add_json_arg


def image_rows(root: Path, images: int) -> pa.Table:
    """A real ingest of `images` small JPEGs into tar shards: the members big rows point at."""
    from data_pipeline.ingest import ingest
    from data_pipeline.manifest import read_manifest

    manifest = ingest(f"synthetic://shapes?n={images}&classes=8&size=16&seed=0", root / "images", workers=0,
                      progress=False)
    return read_manifest(manifest)


def scaled_manifest(rows: int, images: pa.Table, out: Path) -> Path:
    """bench/scale_data's manifest of `rows` rows, each row's bytes one of `images`' members (in turn)."""
    from bench.scale_data import manifest_table
    from data_pipeline.manifest import MANIFEST_NAME, write_manifest

    if (out / MANIFEST_NAME).exists() and json.loads((out / "built.json").read_text())["rows"] == rows:
        return out / MANIFEST_NAME
    table = manifest_table(rows)
    member = pa.array(np.arange(rows) % images.num_rows)
    for name in ("path", "offset", "size", "width", "height", "crc32"):
        table = table.set_column(table.column_names.index(name), name, images[name].take(member))
    write_manifest(table, out, source="synthetic://extract_scale")
    (out / "built.json").write_text(json.dumps({"rows": rows}))
    return out / MANIFEST_NAME


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--images", type=int, default=2048, help="distinct JPEGs the rows point at")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--root", type=Path, default=None, help="keep the inputs here (default: a temp dir)")
    add_json_arg(ap, "extract_scale")
    args = ap.parse_args()
    run = Run()
    from cratescale.checkpoint.export import export_weights
    from cratescale.embeddings.extract import run_extraction
    from cratescale.models import create_model

    root = args.root or Path(tempfile.mkdtemp(prefix="bench_extract_scale_"))
    t = time.perf_counter()
    manifest = scaled_manifest(args.rows, image_rows(root, args.images), root / f"manifest_{args.rows}")
    built_s = time.perf_counter() - t
    model = create_model("crate_mae_debug", img_size=32)
    export_weights(model.state_dict(), model.config, {"step": 0}, root / "export", overwrite=True)
    store = root / f"store_{time.time_ns()}"
    t = time.perf_counter()
    _, records = run_extraction(root / "export", manifest, store, features=["cls", "mean"], layers=[],
                                dtype="float16", batch_size=args.batch, actors=args.actors, image_size=None,
                                loader_kind="auto", ray_address=None, shard_rows=4096, chunk_rows=1024, split=None,
                                num_cpus_per_actor=1.0, num_gpus_per_actor=0.0, amp=None, threads_per_actor=1)
    seconds = time.perf_counter() - t
    actors = {}
    for r in records:
        a = actors.setdefault(int(r["pid"]), {"pid": int(r["pid"]), "shards": 0, "rows": 0, "peak_bytes": 0,
                                              "predicted_bytes": int(r["memory_held"])})
        a["shards"] += 1
        a["rows"] += int(r["rows"])
        a["peak_bytes"] = max(a["peak_bytes"], int(r["peak_memory"]))
    rows = sorted(actors.values(), key=lambda a: a["pid"])
    print(f"{args.rows} rows, {len(records)} shards in {seconds:.0f} s ({args.rows / seconds:.0f} rows/s), "
          f"manifest built in {built_s:.0f} s, load average {os.getloadavg()[0]:.1f}")
    print("| actor | shards | rows | predicted (reserved) | measured peak | measured / predicted |")
    print("|---|---|---|---|---|---|")
    for a in rows:
        a["ratio"] = a["peak_bytes"] / a["predicted_bytes"]
        print(f"| {a['pid']} | {a['shards']} | {a['rows']} | {a['predicted_bytes'] / 2**30:.2f} GiB | "
              f"{a['peak_bytes'] / 2**30:.2f} GiB | {a['ratio']:.2f} |")
    run.save(args.json, {"rows": args.rows, "images": args.images, "batch": args.batch, "seconds": round(seconds, 1),
                         "actors": rows, "target": "measured / predicted in 0.75-1.25 for every actor"})
    return 0 if all(0.75 <= a["ratio"] <= 1.25 for a in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
