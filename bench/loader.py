"""Train-loader throughput: decode + random-resized-crop 224 + flip + normalize, DALI CPU vs PIL.

    .venv/bin/python -m bench.loader [--epochs 2] [--threads 2] [--batch 32] [--repeats 2] [--skip-reshard]
    .venv/bin/python -m bench.loader --gpu [--hw-loads 0,0.75,1]    # DALI mixed decode on a GPU vs DALI CPU

Data: the 1,000 full-size ImageNet sample photos, read in place from imagenet-sample.tar (byte
offsets), then the same photos after `ingest --reshard 256`. Baseline: the PIL + torch DataLoader
backend (same sampler, same windows) with `threads` worker processes; DALI gets `threads` decode
threads and one external-source worker. Same machine, same run, same cores. With --gpu (needs CUDA and
DALI): DALI's mixed decoder at each hardware-decoder share of --hw-loads against DALI on the CPU.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.record import Run, add_json_arg
from data_pipeline.ingest import run_ingest
from data_pipeline.loader import make_train_loader
from data_pipeline.sampler import LoaderState

SOURCE = "/work/shared/data/imagenet-sample.tar"


def measure(manifest: Path, kind: str, epochs: int, threads: int, batch: int, device: str = "cpu",
            hw_decoder_load: float = 0.65) -> dict:
    """img/s over `epochs` epochs: total (start-up included) and steady (after the first batch)."""
    t0 = time.perf_counter()
    loader = make_train_loader(manifest, state=LoaderState(0, 0, 0), rank=0, world_size=1, global_batch=batch,
                               micro_batch=batch, image_size=224, num_patches=196, kind=kind,
                               num_threads=threads, device=device, hw_decoder_load=hw_decoder_load)
    steps = loader.steps_per_epoch * epochs
    next(loader)
    t1 = time.perf_counter()
    for _ in range(steps - 1):
        b = next(loader)
    t2 = time.perf_counter()
    assert b["images"].shape == (batch, 3, 224, 224)
    loader.close()
    return {"total": steps * batch / (t2 - t0), "steady": (steps - 1) * batch / (t2 - t1), "startup": t1 - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-reshard", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="DALI mixed (GPU) decode against DALI on the CPU")
    ap.add_argument("--hw-loads", default="0,0.75,1", help="hardware-decoder shares tried with --gpu")
    add_json_arg(ap, "loader")
    a = ap.parse_args()
    run = Run()
    if a.gpu:
        gpu_main(a)
        return
    results, raw = [], []
    with tempfile.TemporaryDirectory() as d:
        datasets = [("full-size JPEGs in the tar", run_ingest(SOURCE, Path(d) / "raw", workers=0, progress=False))]
        if not a.skip_reshard:
            datasets.append(("after --reshard 256", run_ingest(SOURCE, Path(d) / "r256", workers=0, reshard=256,
                                                              progress=False)))
        for name, res in datasets:
            runs: dict[str, list[dict]] = {"pil": [], "dali": []}
            for _ in range(a.repeats):  # interleaved, best of `repeats`: the machine is shared
                for kind in runs:
                    runs[kind].append(measure(res.manifest, kind, a.epochs, a.threads, a.batch))
            best = {k: {m: (min if m == "startup" else max)(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
            results.append((name, best["pil"], best["dali"]))
            raw.append({"data": name, "runs": runs, "best": best})
    print(f"\nbench/loader.py  RRC 224 + flip + normalize, {a.threads} threads/workers, batch {a.batch}, "
          f"{a.epochs} epochs of 1000 photos, best of {a.repeats}  (machine: {os.cpu_count()}-core CPU, no GPU)")
    print(f"{'data':<28} {'measure':<8} {'PIL baseline':>13} {'DALI cpu':>10} {'ratio':>7} {'target':>7}")
    for name, pil, dali in results:
        for m in ("steady", "total"):
            print(f"{name:<28} {m:<8} {pil[m]:>9.0f} i/s {dali[m]:>6.0f} i/s {dali[m] / pil[m]:>6.2f}x "
                  f"{'>=1.5x':>7}")
        print(f"{'':<28} {'startup':<8} {pil['startup']:>11.1f} s {dali['startup']:>8.1f} s")
    if len(results) == 2:
        for i, kind in ((1, "PIL"), (2, "DALI")):
            print(f"reshard 256 speed-up for {kind}: {results[1][i]['steady'] / results[0][i]['steady']:.2f}x (steady)")
    run.save(a.json, {"threads": a.threads, "batch": a.batch, "epochs": a.epochs, "repeats": a.repeats,
                      "note": "img/s; best = max of the repeats (startup: min); ratio = DALI / PIL of the bests",
                      "target": "DALI / PIL >= 1.5", "raw": raw})


def gpu_main(a: argparse.Namespace) -> None:
    import torch

    from data_pipeline.loader import dali_available

    if not torch.cuda.is_available():
        raise SystemExit("bench/loader.py --gpu: no CUDA device visible")
    if not dali_available():
        raise SystemExit("bench/loader.py --gpu: nvidia.dali is not importable (pip install .[dali-cuda12])")
    loads = [float(x) for x in a.hw_loads.split(",")]
    print(f"bench/loader.py --gpu  RRC 224 + flip + normalize, {a.threads} CPU threads, batch {a.batch}, "
          f"{a.epochs} epochs of 1000 photos, best of {a.repeats}, {torch.cuda.get_device_name(0)}")
    print(f"{'data':<28} {'decoder':<22} {'steady img/s':>13} {'vs DALI cpu':>12}")
    with tempfile.TemporaryDirectory() as d:
        for name, reshard in (("full-size JPEGs in the tar", None), ("after --reshard 256", 256)):
            res = run_ingest(SOURCE, Path(d) / f"r{reshard}", workers=0, reshard=reshard, progress=False)
            runs = {"cpu": (lambda: measure(res.manifest, "dali", a.epochs, a.threads, a.batch, "cpu"))}
            for load in loads:
                runs[f"mixed hw {load:g}"] = (lambda load=load: measure(res.manifest, "dali", a.epochs, a.threads,
                                                                         a.batch, "gpu", load))
            best = {k: max(fn()["steady"] for _ in range(a.repeats)) for k, fn in runs.items()}
            for k, rate in best.items():
                print(f"{name:<28} {'DALI ' + k:<22} {rate:>13,.0f} {rate / best['cpu']:>11.2f}x")


if __name__ == "__main__":
    main()
