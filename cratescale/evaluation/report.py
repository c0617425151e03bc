"""Evaluation entry points: probe + kNN on a stored embedding split next to its baselines (the same
architecture at initialization, raw pixels), per-layer probes, diagnostics, and the report folder.

`write_report(out_dir, ...)` writes:
  metrics.json          results (pretrained), baselines (init, pixels), comparison (top-1 % and the
                        difference in points), per-layer results and the best layer, diagnostic curves
                        (pretrained and init), anything passed as `extra`
  results.md            the side-by-side table (pretrained | init | raw pixels | differences), per-layer table
  results.png, layers.png, attention.png, pca.png, reconstructions.png, finetune.png   (those that have inputs)
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from cratescale.checkpoint.export import load_model, read_export_header
from cratescale.evaluation import plots
from cratescale.evaluation.diagnostics import denormalize, reconstructions, run_diagnostics
from cratescale.evaluation.finetune_report import finetune_table, summarize
from cratescale.evaluation.protocol import (MODELS, best_layer, compare, evaluate_layers, evaluate_pixels,
                                            evaluate_store)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _points(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f}"


def _with_ci(pct: float | None, r: Mapping[str, Any] | None) -> str:
    """'50.00 [43.1, 56.9]': top-1 (%) and its 95% Wilson interval where the result carries one."""
    ci = (r or {}).get("top1_ci95")
    return _pct(pct) if pct is None or not ci else f"{pct:.2f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def results_table(results: Mapping[str, Mapping[str, Any]],
                  baselines: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None) -> str:
    """Top-1 of the pretrained features beside init and raw pixels (same protocol), each with its 95% interval,
    and the differences."""
    baselines = baselines or {}
    table = compare(results, baselines)
    lines = ["| feature | method | pretrained (%) | init (%) | raw pixels (%) | vs init (points) | "
             "vs pixels (points) | detail | train / test |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        feature, method = name.split("/", 1)
        if r["method"] == "knn":
            detail = f"k={r['k']}, T={r['temperature']}, top-5 {100 * r['top5']:.2f}"
        else:
            detail = f"C={r['best_C']:g}"
        row = table[name]
        init, pixels = baselines.get("init", {}).get(name), baselines.get("pixels", {}).get(f"pixels/{method}")
        lines.append(f"| {feature} | {r['method']} | {_with_ci(row['pretrained'], r)} | "
                     f"{_with_ci(row['init'], init)} | {_with_ci(row['pixels'], pixels)} | "
                     f"{_points(row['vs_init'])} | {_points(row['vs_pixels'])} | {detail} | "
                     f"{r['n_train']} / {r['n_test']} |")
    return "\n".join(lines) + "\n"


def _intervals(results: Mapping[str, Mapping[str, Any]],
               baselines: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, list | None]]:
    """{model: {result name: [low, high] (fractions) or None}}, matched as `compare` matches the baselines."""
    def of(model: str, name: str) -> list | None:
        key = {"pretrained": name, "init": name, "pixels": f"pixels/{name.split('/', 1)[1]}"}[model]
        found = results.get(name) if model == "pretrained" else baselines.get(model, {}).get(key)
        return (found or {}).get("top1_ci95")
    return {model: {name: of(model, name) for name in results} for model in MODELS}


def context_line(context: Mapping[str, Any], results: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """'run cifar10, step 300, set pretrain: 4,500 train / 500 test images': what every figure and table is of."""
    parts = [f"{k} {context[k]}" for k in ("run", "step", "set") if context.get(k) is not None]
    first = next(iter((results or {}).values()), None)
    sizes = f"{first['n_train']:,} train / {first['n_test']:,} test images" if first else ""
    return ", ".join(parts) + (": " if parts and sizes else "") + sizes


def reading(comparison: Mapping[str, Mapping[str, float | None]]) -> str:
    """One line for a reader when the pretrained features lose to a baseline ('' when they do not)."""
    below = [(name, model, row["pretrained"], row[model]) for name, row in comparison.items()
             for model in ("pixels", "init") if row.get(model) is not None and row["pretrained"] < row[model]]
    if not below:
        return ""
    name, model, mine, theirs = below[0]
    what = {"pixels": "raw pixels", "init": "the same architecture at its initialization"}[model]
    more = f" ({len(below) - 1} more row(s) below a baseline)" if len(below) > 1 else ""
    return (f"Reading: the pretrained {name} ({mine:.1f}%) is below {what} ({theirs:.1f}%) by {theirs - mine:.1f} "
            f"points{more}: on this run the pretraining has not (yet) learned features that beat it; compare the "
            f"95% intervals before reading more into small differences.")


def layers_table(layers: Mapping[str, Mapping[int, Mapping[str, Mapping[str, Any]]]],
                 best: Mapping[str, Any] | None) -> str:
    """Per-layer top-1 (%) of every method, pretrained and init side by side, and the best layer."""
    models = [m for m in MODELS if layers.get(m)]
    methods = list(next(iter(layers[models[0]].values())))
    head = [f"{method} {model}" for method in methods for model in models]
    lines = ["| layer | " + " | ".join(head) + " |", "|---" * (1 + len(head)) + "|"]
    for layer in layers[models[0]]:
        cells = [_pct(100 * layers[m][layer][method]["top1"]) if layer in layers[m] else "-"
                 for method in methods for m in models]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    if best:
        lines.append(f"\nBest layer (pretrained, {best['method']}): {best['layer']} "
                     f"({100 * best['top1']:.2f}%)")
    return "\n".join(lines) + "\n"


def layer_curves(layers: Mapping[int, Mapping[str, Mapping[str, Any]]],
                 diagnostics: Mapping[str, Any] | None) -> dict[str, list[float]]:
    """Probe and kNN top-1 (%) per layer, followed by the diagnostics' curves, for one model."""
    curves: dict[str, list[float]] = {}
    for method, key in (("linear_probe", "probe"), ("knn", "knn")):
        if layers and all(method in v for v in layers.values()):
            curves[key] = [100 * layers[i][method]["top1"] for i in sorted(layers)]
    curves.update((diagnostics or {}).get("curves", {}))
    return curves


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
                 extra: Mapping[str, Any] | None = None,
                 baselines: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
                 layers: Mapping[str, Mapping[int, Mapping[str, Any]]] | None = None,
                 init_diagnostics: Mapping[str, Any] | None = None,
                 context: Mapping[str, Any] | None = None,
                 finetune: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> dict[str, Path]:
    """Write metrics.json, results.md and the PNGs that the given inputs allow; returns {name: path}.
    `results` are the pretrained features', `baselines` {"init": ..., "pixels": ...} the same protocol on
    the baselines, `layers` {"pretrained"|"init": {layer: {method: result}}}. `images` (normalized
    (B, 3, H, W)) are the batch `diagnostics` was computed on; with `model` they also give the
    reconstruction grid. `context` ({"run", "step", "set"}) goes on every figure and table with the set sizes.
    `finetune` ({arm: eval rows}, finetune_report.read_curves) adds the fine-tune rows and curves."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    baselines, layers = dict(baselines or {}), {k: v for k, v in (layers or {}).items() if v}
    metrics: dict[str, Any] = {"results": dict(results or {}), "baselines": baselines,
                               "extra": dict(extra or {})}
    about = context_line(context or {}, results)
    metrics["context"] = {**dict(context or {}), "about": about}
    md = [f"# Results: {about}\n\nTop-1 (%) with its 95% Wilson interval in brackets.\n"]
    if results:
        metrics["comparison"] = compare(results, baselines)
        md.append(results_table(results, baselines) + (f"\n{line}\n" if (line := reading(metrics["comparison"]))
                                                       else ""))
        written["results.png"] = plots.plot_comparison(metrics["comparison"], out / "results.png",
                                                       cis=_intervals(results, baselines), title=about)
    if layers:
        metrics["layers"] = layers
        metrics["best_layer"] = best_layer(layers.get("pretrained", {}))
        md.append("## Per layer (mean-pooled block output), top-1 (%)\n\n" +
                  layers_table(layers, metrics["best_layer"]))
    if finetune:
        metrics["finetune"] = {"summary": summarize(finetune), "curves": finetune}
        md.append("## Fine-tuning: held-out top-1 at the last step, 95% Wilson interval in brackets\n\n" +
                  finetune_table(metrics["finetune"]["summary"]))
        written["finetune.png"] = plots.plot_finetune_curves(finetune, out / "finetune.png", title=about)
    if len(md) > 1:
        (out / "results.md").write_text("\n".join(md))
        written["results.md"] = out / "results.md"
    runs = {"pretrained": layer_curves(layers.get("pretrained", {}), diagnostics)}
    if init_diagnostics or layers.get("init"):
        runs["init"] = layer_curves(layers.get("init", {}), init_diagnostics)
    stds = {"pretrained": (diagnostics or {}).get("curves_std", {}),
            "init": (init_diagnostics or {}).get("curves_std", {})}
    refs = {key: {"raw pixels": 100 * baselines["pixels"][f"pixels/{method}"]["top1"]}
            for method, key in (("linear_probe", "probe"), ("knn", "knn"))
            if f"pixels/{method}" in baselines.get("pixels", {}) and key in runs["pretrained"]}
    if any(runs.values()):
        written["layers.png"] = plots.plot_layer_comparison(runs, out / "layers.png", stds=stds, refs=refs,
                                                            title=f"Per encoder layer: {about}")
    for key, diag in (("diagnostics", diagnostics), ("diagnostics_init", init_diagnostics)):
        if diag:
            metrics[key] = {k: v for k, v in diag.items() if k not in ("attention", "pca")}
    if diagnostics and images is not None:
        shown = denormalize(images)
        where = f"{(context or {}).get('run', 'model')}, step {(context or {}).get('step', '?')}"
        layer = f"layer {diagnostics.get('depth', '?')} (last)"
        written["attention.png"] = plots.plot_attention_grid(
            shown, diagnostics["attention"], out / "attention.png",
            title=f"Attention of the cls token (query) over the patches, {layer}, per head: {where}")
        written["pca.png"] = plots.plot_pca(
            shown, diagnostics["pca"], out / "pca.png",
            title=f"Patch features of {layer}: top 3 principal components as RGB: {where}")
    if model is not None and images is not None:
        r = reconstructions(model, images, seed=seed)
        metrics["reconstruction_mask_ratio"] = r["mask_ratio"]
        written["reconstructions.png"] = plots.plot_reconstruction_grid(
            r["original"], r["masked"], r["reconstruction"], out / "reconstructions.png",
            title=f"Reconstructions ({r['mask_ratio']:.0%} of patches masked): {about}")
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
             image_size: int | None = None, loader_kind: str = "auto", seed: int = 0,
             init_export: Path | str | None = None, init_store: Path | str | None = None,
             pixels: bool = True, layers: bool = True,
             finetune: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
             progress: Callable[[str], None] = lambda what: None) -> dict[str, Path]:
    """The evaluate stage: probe + kNN on the store, the same on `init_store` (the architecture at its
    initialization) and on raw pixels of the same rows, per-layer probes on every stored layer (pooled as
    the first feature), diagnostics of the export's model and of `init_export` on a fixed batch. `progress` is told
    each part as it starts (minutes each at ImageNet scale; the launcher prints them). `finetune` ({arm: eval rows})
    adds the fine-tune stage's rows and curves."""
    protocol = dict(knn_k=knn_k, knn_temperature=knn_temperature, probe=probe, seed=seed)
    size = int(image_size or read_export_header(export_dir)["model_config"]["img_size"])
    progress(f"probe and kNN on the pretrained {', '.join(features)}")
    results = evaluate_store(store_dir, features=features, **protocol)
    baselines: dict[str, dict[str, Any]] = {}
    if init_store is not None:
        progress("the same on the init baseline")
        baselines["init"] = evaluate_store(init_store, features=features, **protocol)
    if pixels:
        progress("the same on raw pixels")
        baselines["pixels"] = evaluate_pixels(store_dir, manifest_path, size, loader_kind=loader_kind, **protocol)
    per_layer: dict[str, dict] = {}
    if layers:
        pool = "mean" if "mean" in features else features[0]
        progress(f"per layer ({pool}-pooled blocks)")
        per_layer["pretrained"] = evaluate_layers(store_dir, pool, **protocol)
        if init_store is not None:
            per_layer["init"] = evaluate_layers(init_store, pool, **protocol)
    diag = init_diag = images = model = None
    if diagnostics:
        progress("white-box diagnostics and figures")
        model, _ = load_model(export_dir)
        images = diagnostic_batch(manifest_path, diagnostic_images, size, loader_kind=loader_kind)
        diag = run_diagnostics(model, images)
        if init_export is not None:
            init_diag = run_diagnostics(load_model(init_export)[0], images)
    extra = {"export": str(export_dir), "store": str(store_dir), "init_export": init_export and str(init_export),
             "init_store": init_store and str(init_store), "image_size": size}
    made = read_export_header(export_dir).get("provenance", {})
    context = {"run": made.get("run") or made.get("run_name"), "step": made.get("step"), "set": Path(out_dir).name}
    return write_report(out_dir, results=results, diagnostics=diag, images=images, model=model, seed=seed,
                        extra=extra, baselines=baselines, layers=per_layer, init_diagnostics=init_diag,
                        context=context, finetune=finetune)
