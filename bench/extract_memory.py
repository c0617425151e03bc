"""Extraction memory per actor (issue 14.3): predicted (cratescale/embeddings/memory.py) vs measured peak RSS.

    .venv/bin/python -m bench.extract_memory [--batches 16,64,128] [--images-per-batch 2] [--loader auto]

crate_mae_debug at 224 px (patch 8: 785 tokens, 4 heads), synthetic JPEGs. Each configuration runs in a fresh
process (what one actor is: the model, the loader, the store) over the whole manifest and reports its own peak
RSS (ru_maxrss) and its footprint as the actor follows it (RSS + its DALI feed worker's private pages, the
measure the prediction covers since issue 31); "chunked" is the product path (encoder forward in chunks, memory.encode_chunk), "whole" runs
the forward on the whole batch (chunk = batch, as before issue 14). Encode img/s of both, side by side, says
whether chunking costs speed. Targets: predicted within 25% of measured for every row; chunked encode speed
>= 0.9 x whole at the same batch.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.record import Run, add_json_arg
from cratescale.checkpoint.export import export_weights
from cratescale.embeddings.extract import data_cost
from cratescale.embeddings.memory import encode_chunk, predict_actor_bytes
from cratescale.models import create_model

ONE = r"""
import json, resource, sys
from cratescale.embeddings.extract import ShardWorker, prepare_store
export, manifest, store, batch, chunk, loader = sys.argv[1:7]
info = prepare_store(export, manifest, store, features=["cls", "mean"], layers=[], dtype="float16",
                     shard_rows=int(batch) * 2, chunk_rows=int(batch), split=None)
w = ShardWorker(export, manifest, store, features=["cls", "mean"], layers=[], split=None, batch_size=int(batch),
                image_size=None, loader_kind=loader, threads=2, chunk=int(chunk))
records = w.run_shards(info.missing())
rows = sum(r["rows"] for r in records)
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "peak_memory": max(r["peak_memory"] for r in records),
                  "encode_img_s": rows / sum(r["encode_seconds"] for r in records)}))
"""


def measure(export: Path, manifest: Path, root: Path, batch: int, chunk: int, loader: str) -> dict:
    store = root / f"store_{batch}_{chunk}"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", ONE, str(export), str(manifest), str(store), str(batch), str(chunk),
                          loader], capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="16,64,128")
    ap.add_argument("--images-per-batch", type=int, default=2, help="images = this x the largest batch")
    ap.add_argument("--loader", default="auto")
    add_json_arg(ap, "extract_memory")
    args = ap.parse_args()
    run = Run()
    rows = []
    from data_pipeline.ingest import ingest

    batches = [int(b) for b in args.batches.split(",")]
    root = Path(tempfile.mkdtemp(prefix="bench_extract_memory_"))
    n = args.images_per_batch * max(batches)
    manifest = Path(ingest(f"synthetic://shapes?n={n}&classes=4&size=96&seed=0", root / "data", workers=0,
                           progress=False))
    model = create_model("crate_mae_debug", img_size=224)
    export_weights(model.state_dict(), model.config, {"step": 0}, root / "export")
    config = dict(model.config)
    data = data_cost(manifest, args.loader, None)
    print(f"crate_mae_debug 224 px, {n} images, loader {args.loader}, load average {os.getloadavg()[0]:.1f}")
    print("| batch | forward | chunk | predicted peak | measured peak (RSS + feed worker) | measured / predicted | "
          "encode img/s |")
    print("|---|---|---|---|---|---|---|")
    for batch in batches:
        for mode, chunk in (("chunked", encode_chunk(config, 224, "cpu", batch)), ("whole", batch)):
            got = measure(root / "export", manifest, root, batch, chunk, args.loader)
            want = predict_actor_bytes(config, 224, batch, "cpu", chunk=chunk, data=data)
            print(f"| {batch} | {mode} | {chunk} | {want / 2**30:.2f} GiB | {got['peak_memory'] / 2**30:.2f} GiB | "
                  f"{got['peak_memory'] / want:.2f} | {got['encode_img_s']:.1f} |", flush=True)
            rows.append({"batch": batch, "forward": mode, "chunk": chunk, "predicted_bytes": want, **got,
                         "measured_over_predicted": got["peak_memory"] / want})
    run.save(args.json, {"images": n, "loader": args.loader, "rows": rows,
                         "targets": "measured / predicted in 0.75-1.25; chunked img/s >= 0.9 x whole"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
