"""The linear probe (torch L-BFGS, C search on a subset with early stop) against the scikit-learn pipeline it
replaced (StandardScaler + LogisticRegression lbfgs, full C search on one BLAS thread), side by side on one
run's stored features: same rows, split, C grid and refit.

    python -m bench.probe runs/cifar10 [--features mean layer_0_mean] [--pixels]

--pixels adds the raw-pixel baseline (45,000 x 3,072 on CIFAR-10: scikit-learn's side took 18 minutes)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from bench.record import Run
from cratescale.evaluation.data import load_pixels, load_split
from cratescale.evaluation.probe import DEFAULT_CS, linear_probe
from cratescale.evaluation.protocol import open_store


def sklearn_probe(tr_x: np.ndarray, tr_y: np.ndarray, te_x: np.ndarray, te_y: np.ndarray) -> dict:
    t0 = time.perf_counter()
    fit_x, val_x, fit_y, val_y = train_test_split(tr_x, tr_y, test_size=int(round(0.2 * len(tr_y))),
                                                  random_state=0, stratify=tr_y)

    def fit(x, y, c):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)).fit(x, y)

    with threadpool_limits(1):  # what the old probe ran with (its BLAS thread hand-offs dominated)
        val_top1 = {c: float((fit(fit_x, fit_y, c).predict(val_x) == val_y).mean()) for c in DEFAULT_CS}
        best_c = max(val_top1, key=lambda c: (val_top1[c], -c))
        top1 = float((fit(tr_x, tr_y, best_c).predict(te_x) == te_y).mean())
    return {"top1": top1, "best_C": best_c, "val_top1": val_top1, "seconds": time.perf_counter() - t0}


def compare(tr: tuple, te: tuple) -> dict:
    ours = linear_probe(*tr, *te)
    ref = sklearn_probe(*tr, *te)
    keep = ("top1", "best_C", "val_top1", "n_search", "seconds")
    return {"torch": {k: ours[k] for k in keep}, "sklearn": ref, "speedup": ref["seconds"] / ours["seconds"],
            "top1_points": 100 * (ours["top1"] - ref["top1"]), "shape": list(tr[0].shape)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--features", nargs="+", default=["mean"])
    ap.add_argument("--pixels", action="store_true")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("bench/results/probe.json"))
    args = ap.parse_args()
    run = Run()
    store = open_store(args.run_dir / "embeddings" / "pretrain")
    rows = {}
    for feature in args.features:
        rows[feature] = compare(load_split(store, feature, "train"), load_split(store, feature, "val"))
    if args.pixels:
        manifest = args.run_dir / "data" / "manifest.parquet"
        tr, te = (load_pixels(store, manifest, split, args.image_size)[:2] for split in ("train", "val"))
        rows["pixels"] = compare(tr, te)
    for name, r in rows.items():
        print(f"{name} {r['shape']}: torch {100 * r['torch']['top1']:.2f}% in {r['torch']['seconds']:.1f} s "
              f"(C={r['torch']['best_C']}), scikit-learn {100 * r['sklearn']['top1']:.2f}% in "
              f"{r['sklearn']['seconds']:.1f} s (C={r['sklearn']['best_C']}): {r['speedup']:.2f}x, "
              f"{r['top1_points']:+.2f} points")
    run.save(args.out, {"run_dir": str(args.run_dir), "rows": rows})


if __name__ == "__main__":
    main()
