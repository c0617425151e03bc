"""Evaluation entry points: probe + kNN on a stored embedding split, diagnostics, and the report folder.

`write_report(out_dir, ...)` writes:
  metrics.json          probe/kNN results, per-layer diagnostic curves, anything passed as `extra`
  results.md            the markdown table of top-1 per feature and method
  results.png, layers.png, attention.png, pca.png, reconstructions.png   (those that have inputs)
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from cratescale.embeddings.store import EmbeddingStore
from cratescale.evaluation import plots
from cratescale.evaluation.diagnostics import denormalize, reconstructions, run_diagnostics
from cratescale.evaluation.knn import knn_eval
from cratescale.evaluation.probe import linear_probe


def load_split(store: EmbeddingStore, feature: str, split: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(features float32 (n, d), labels (n,), rows left out) of one split, committed shards only. Rows whose
    image could not be read or decoded at extraction (valid False, NaN features) are left out and counted."""
    meta = store.metadata()
    of_split = meta.loc[meta.split == split]
    rows = np.sort(of_split.loc[of_split.valid, "row"].to_numpy())
    if len(rows) == 0:
        have = sorted(meta.split.unique()) if len(meta) else []
        raise ValueError(f"{store.root}: no committed rows of split {split!r} with a decoded image "
                         f"({len(of_split)} rows, splits present: {have})")
    x = store.read(feature, rows).astype(np.float32)
    y = meta.set_index("row").loc[rows, "label"].to_numpy().astype(np.int64)
    return x, y, len(of_split) - len(rows)


def evaluate_store(store_dir: Path | str, *, features: Sequence[str] = ("cls",), train_split: str = "train",
                   test_split: str = "val", knn_k: int = 20, knn_temperature: float = 0.07, probe: bool = True,
                   seed: int = 0) -> dict[str, dict[str, Any]]:
    """{"<feature>/knn": ..., "<feature>/linear_probe": ...} on a store's train and test splits."""
    store = EmbeddingStore(store_dir)
    if store.missing():
        raise ValueError(f"{store.root}: {len(store.missing())} of {store.info.num_shards} shards are not "
                         f"committed; finish the extraction first")
    results: dict[str, dict[str, Any]] = {}
    for feature in features:
        tr_x, tr_y, tr_out = load_split(store, feature, train_split)
        te_x, te_y, te_out = load_split(store, feature, test_split)
        left_out = {train_split: tr_out, test_split: te_out}
        results[f"{feature}/knn"] = {**knn_eval(tr_x, tr_y, te_x, te_y, k=knn_k, temperature=knn_temperature),
                                     "left_out": left_out}
        if probe:
            results[f"{feature}/linear_probe"] = {**linear_probe(tr_x, tr_y, te_x, te_y, seed=seed),
                                                  "left_out": left_out}
    if tr_out or te_out:
        print(f"[cratescale] evaluate: left out {tr_out} {train_split} and {te_out} {test_split} rows whose image "
              f"could not be decoded at extraction (valid=False in {store.root / 'metadata'})", flush=True)
    return results


def results_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    lines = ["| feature | method | top-1 (%) | detail | train / test |", "|---|---|---|---|---|"]
    for name, r in results.items():
        feature = name.split("/")[0]
        if r["method"] == "knn":
            detail = f"k={r['k']}, T={r['temperature']}, top-5 {100 * r['top5']:.2f}"
        else:
            detail = f"C={r['best_C']:g}"
        lines.append(f"| {feature} | {r['method']} | {100 * r['top1']:.2f} | {detail} | "
                     f"{r['n_train']} / {r['n_test']} |")
    return "\n".join(lines) + "\n"


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_report(out_dir: Path | str, *, results: Mapping[str, Mapping[str, Any]] | None = None,
                 diagnostics: Mapping[str, Any] | None = None, images: torch.Tensor | None = None,
                 model: torch.nn.Module | None = None, seed: int = 0,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write metrics.json, results.md and the PNGs that the given inputs allow; returns {name: path}.
    `images` (normalized (B, 3, H, W)) are the batch `diagnostics` was computed on; with `model` they
    also give the reconstruction grid."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    metrics: dict[str, Any] = {"results": dict(results or {}), "extra": dict(extra or {})}
    if results:
        (out / "results.md").write_text(results_table(results))
        written["results.md"] = out / "results.md"
        written["results.png"] = plots.plot_results(results, out / "results.png")
    if diagnostics:
        metrics["diagnostics"] = {k: v for k, v in diagnostics.items() if k not in ("attention", "pca")}
        written["layers.png"] = plots.plot_layer_curves(diagnostics["curves"], out / "layers.png",
                                                         stds=diagnostics.get("curves_std"))
        if images is not None:
            shown = denormalize(images)
            written["attention.png"] = plots.plot_attention_grid(shown, diagnostics["attention"],
                                                                 out / "attention.png")
            written["pca.png"] = plots.plot_pca(shown, diagnostics["pca"], out / "pca.png")
    if model is not None and images is not None:
        r = reconstructions(model, images, seed=seed)
        metrics["reconstruction_mask_ratio"] = r["mask_ratio"]
        written["reconstructions.png"] = plots.plot_reconstruction_grid(
            r["original"], r["masked"], r["reconstruction"], out / "reconstructions.png")
    (out / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2, sort_keys=True))
    written["metrics.json"] = out / "metrics.json"
    return written


def diagnostic_batch(manifest_path: Path | str, n: int, image_size: int, *, split: str = "val",
                     loader_kind: str = "auto") -> torch.Tensor:
    """n images of `split` spread evenly over the manifest (which is sorted by class), so the fixed batch
    shows several classes (resize + center crop)."""
    import pandas as pd
    from data_pipeline.loader import make_eval_loader

    manifest = pd.read_parquet(manifest_path, columns=["split"])
    rows = np.flatnonzero(manifest.split.to_numpy() == split)
    if len(rows) == 0:
        rows = np.arange(len(manifest))
    rows = rows[np.linspace(0, len(rows) - 1, num=min(n, len(rows))).astype(np.int64)]
    loader = make_eval_loader(manifest_path, rows, batch_size=len(rows), image_size=image_size, kind=loader_kind)
    try:
        return next(iter(loader))["images"].cpu()
    finally:
        loader.close()


def evaluate(export_dir: Path | str, store_dir: Path | str, manifest_path: Path | str, out_dir: Path | str, *,
             features: Sequence[str] = ("cls",), knn_k: int = 20, knn_temperature: float = 0.07,
             probe: bool = True, diagnostics: bool = True, diagnostic_images: int = 8,
             image_size: int | None = None, loader_kind: str = "auto", seed: int = 0) -> dict[str, Path]:
    """The evaluate stage: probe + kNN on the store, diagnostics + reconstructions of the export's model on
    a fixed batch, all written to out_dir."""
    from cratescale.embeddings.extract import load_model

    results = evaluate_store(store_dir, features=features, knn_k=knn_k, knn_temperature=knn_temperature,
                             probe=probe, seed=seed)
    diag, images, model = None, None, None
    if diagnostics:
        model, provenance = load_model(export_dir)
        size = int(image_size or model.img_size)
        images = diagnostic_batch(manifest_path, diagnostic_images, size, loader_kind=loader_kind)
        diag = run_diagnostics(model, images)
    extra = {"export": str(export_dir), "store": str(store_dir)}
    return write_report(out_dir, results=results, diagnostics=diag, images=images, model=model, seed=seed,
                        extra=extra)
