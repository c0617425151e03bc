"""The universal conversion after a change of world size (issue 31.6): time vs model size, one worker vs the
node's cores, on a real DeepSpeed ZeRO-2 checkpoint (1 rank, gloo, fp32 AdamW after one step).

    .venv/bin/python -m bench.universal [--models crate_mae_tiny,crate_mae_small,crate_mae_base]
                                        [--json bench/results/universal.json]

Each model is saved and converted in a fresh process (`--one MODEL`), the conversions in turn: 1 worker, then
cratescale's choice (`conversion_workers()`: the CPUs of the process, at most 16). Every GPU of the job waits for
this conversion at the first start on a new world size, so its time belongs in the restart estimate. Target
(written before the run): the node's cores convert at least 1.3x faster than one worker on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.record import Run, add_json_arg

TARGET = 1.3


def one(model_name: str) -> dict:
    import torch

    from bench.checkpoint import make_engine
    from cratescale.checkpoint.universal import conversion_workers, convert
    from cratescale.models import create_model
    import bench.checkpoint as ckpt_bench

    def build(kind: str):
        torch.manual_seed(0)
        model = create_model(kind)
        images = torch.randn(1, 3, model.img_size, model.img_size)
        return model, lambda m: m(images)[0]

    ckpt_bench.build_model = build
    engine, n_params = make_engine(model_name)
    root = Path(tempfile.mkdtemp(prefix="universal-bench-"))
    try:
        engine.save_checkpoint(str(root / "step"), tag="ds")
        src = root / "step" / "ds"
        size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
        result = {"model": model_name, "params": n_params, "checkpoint_bytes": size, "seconds": {}}
        for workers in sorted({1, conversion_workers()}):
            out = root / f"out{workers}"
            t0 = time.perf_counter()
            convert(src, out / "ds", workers=workers)
            result["seconds"][str(workers)] = time.perf_counter() - t0
            shutil.rmtree(out)
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="crate_mae_tiny,crate_mae_small,crate_mae_base")
    add_json_arg(parser, "universal")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one)), flush=True)
        return
    run, rows = Run(), []
    for name in args.models.split(","):
        out = subprocess.run([sys.executable, "-m", "bench.universal", "--one", name], capture_output=True, text=True,
                             env=dict(os.environ, DS_ACCELERATOR="cpu"), timeout=3600)
        if out.returncode:
            raise SystemExit(f"bench.universal --one {name} failed: {out.stderr[-2000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        secs = row["seconds"]
        many = max(secs, key=int)
        row["speedup"] = secs["1"] / secs[many]
        rows.append(row)
        print(f"{name:16s} {row['params'] / 1e6:6.1f}M params {row['checkpoint_bytes'] / 2**20:7.0f} MiB  "
              f"1 worker {secs['1']:6.1f} s  {many} workers {secs[many]:6.1f} s  speed-up {row['speedup']:.2f} "
              f"(target >= {TARGET}: {'met' if row['speedup'] >= TARGET else 'missed'})", flush=True)
    run.save(args.json, {"rows": rows, "target": TARGET})


if __name__ == "__main__":
    main()
