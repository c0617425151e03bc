"""Extraction throughput (decode + encode + store) vs bare `model.encode` on already-decoded tensors.

    .venv/bin/python -m bench.extract [--model crate_mae_tiny] [--images 192] [--image-size 224]
                                      [--source-size 128] [--batch-size 32] [--shard-rows 48] [--loader auto]

Same run, same cores (2 here): the baseline decodes every image first (untimed) and times encode alone
with 2 torch threads; the extraction runs in-process (actors=0, 2 threads), with 1 Ray actor (2 threads)
and with 2 Ray actors (1 thread each). "wall" includes actor start-up and model loading; "steady" is rows
/ the busiest actor's summed per-shard time (decode + encode + write), which is what a long run converges
to; "encode share" is the busiest actor's time inside model.encode / its total shard time: the same
ratio measured inside one process at one moment, immune to load drift between configurations.
Target: >= 0.85. Configurations are interleaved and repeated (--repeats): on a
shared machine the load drifts, so each ratio uses its own repeat's baseline and the table shows medians.
"""
from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.record import Run, add_json_arg
from cratescale.checkpoint.export import export_weights, load_model
from cratescale.embeddings.extract import run_extraction
from data_pipeline.local_ray import start_or_join_ray
from cratescale.models import create_model

THREADS = 2


def bare_encode(export: Path, manifest: Path, n: int, image_size: int, batch: int, kind: str) -> float:
    from data_pipeline.loader import make_eval_loader

    torch.set_num_threads(THREADS)
    model, _ = load_model(export)
    batches = [b["images"] for b in make_eval_loader(manifest, np.arange(n), batch, image_size, kind=kind)]
    with torch.no_grad():
        model.encode(batches[0])                       # warm-up
        t = time.perf_counter()
        for x in batches:
            model.encode(x)
        return n / (time.perf_counter() - t)


def extraction(export: Path, manifest: Path, store: Path, *, actors: int, threads: int, opts: dict) -> tuple:
    """(img/s wall, img/s steady, encode share, actors used). Steady: rows / the busiest actor's summed shard
    time (decode + encode + write). Encode share: that actor's time inside model.encode / its shard time,
    i.e. extraction speed vs bare encode measured in the same process at the same moment."""
    t = time.perf_counter()
    _, records = run_extraction(export, manifest, store, actors=actors, threads_per_actor=threads, **opts)
    wall = time.perf_counter() - t
    busy, enc = collections.Counter(), collections.Counter()
    for r in records:
        busy[int(r["pid"])] += float(r["seconds"])
        enc[int(r["pid"])] += float(r["encode_seconds"])
    rows = sum(int(r["rows"]) for r in records)
    pid = max(busy, key=busy.get)
    return rows / wall, rows / busy[pid], enc[pid] / busy[pid], len(busy)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="crate_mae_tiny")
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--source-size", type=int, default=128, help="side of the synthetic JPEGs")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-rows", type=int, default=48)
    ap.add_argument("--loader", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only-inprocess", action="store_true", help="skip the Ray configurations")
    add_json_arg(ap, "extract")
    args = ap.parse_args()
    run = Run()
    from data_pipeline.ingest import ingest

    root = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        manifest = ingest(f"synthetic://shapes?n={args.images}&classes=10&size={args.source_size}&seed=0",
                          root / "data", workers=0, progress=False)
        torch.manual_seed(0)
        model = create_model(args.model, img_size=args.image_size)
        export_weights(model.state_dict(), model.config, {"bench": True}, root / "export")
        del model
        opts = dict(features=("cls", "mean"), layers=(), dtype="float16", batch_size=args.batch_size,
                    image_size=args.image_size, loader_kind=args.loader, ray_address=None,
                    shard_rows=args.shard_rows, chunk_rows=args.shard_rows, split=None, num_cpus_per_actor=0.5,
                    num_gpus_per_actor=0.0, amp=None)
        if not args.only_inprocess:
            start_or_join_ray()                                        # Ray start-up is not part of any number
        configs = (("extract in-process", 0, THREADS), ("extract Ray, 1 actor", 1, THREADS),
                   ("extract Ray, 2 actors", 2, 1))
        runs: dict[str, list] = collections.defaultdict(list)
        # Interleaved repeats: on a shared machine the load drifts; each repeat has its own baseline.
        for rep in range(args.repeats):
            base = bare_encode(root / "export", manifest, args.images, args.image_size, args.batch_size,
                               args.loader)
            runs["bare encode (decoded tensors)"].append((base, base, 1.0, 1, base))
            for label, actors, threads in configs:
                if args.only_inprocess and actors:
                    continue
                wall, steady, share, used = extraction(root / "export", manifest, root / f"store_{actors}_{rep}",
                                                       actors=actors, threads=threads, opts=opts)
                runs[label].append((wall, steady, share, max(used, 1), base))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.model} @ {args.image_size}px, {args.images} images, batch {args.batch_size}, shards of "
          f"{args.shard_rows}, loader {args.loader}, {THREADS} CPU threads in total, median of {args.repeats} "
          f"interleaved repeats (ratio = steady / the same repeat's baseline)")
    print(f"{'config':<28}{'img/s wall':>11}{'img/s steady':>13}{'steady/base':>12}{'encode share':>13}"
          f"{'target':>8}{'actors':>7}")
    for label, rs in runs.items():
        med = lambda xs: float(np.median(xs))  # noqa: E731
        print(f"{label:<28}{med([r[0] for r in rs]):>11.1f}{med([r[1] for r in rs]):>13.1f}"
              f"{med([r[1] / r[4] for r in rs]):>12.2f}{med([r[2] for r in rs]):>13.2f}{'>=0.85':>8}{rs[0][3]:>7}")
    keys = ("img_s_wall", "img_s_steady", "encode_share", "actors", "baseline_img_s")
    run.save(args.json, {"model": args.model, "images": args.images, "image_size": args.image_size,
                         "batch_size": args.batch_size, "loader": args.loader, "target": ">= 0.85",
                         "repeats": {label: [dict(zip(keys, r)) for r in rs] for label, rs in runs.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
