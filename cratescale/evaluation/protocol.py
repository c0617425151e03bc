"""One protocol for every feature set: weighted kNN (k, T) and the linear probe (C searched on a carved
validation split, fixed seed) on a store's train split, top-1 on its test split. The pretrained features,
the same architecture at its initialization and raw pixels all go through `evaluate_arrays`, so their
numbers differ only by the features."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cratescale.embeddings.store import EmbeddingStore, StoreError
from cratescale.evaluation.data import left_out, load_pixels, load_split
from cratescale.evaluation.knn import knn_eval
from cratescale.evaluation.probe import linear_probe

MODELS = ("pretrained", "init", "pixels")  # the order every table and plot shows them in


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy of `correct` out of `n`: unlike the normal approximation it stays
    inside [0, 1] and is honest at small n (200 test images at 50%: about +-7 points)."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def evaluate_arrays(tr_x: np.ndarray, tr_y: np.ndarray, te_x: np.ndarray, te_y: np.ndarray, *, knn_k: int = 20,
                    knn_temperature: float = 0.07, probe: bool = True, seed: int = 0) -> dict[str, dict[str, Any]]:
    """{"knn": ..., "linear_probe": ...} (the probe only when `probe`)."""
    out = {"knn": knn_eval(tr_x, tr_y, te_x, te_y, k=knn_k, temperature=knn_temperature)}
    if probe:
        out["linear_probe"] = linear_probe(tr_x, tr_y, te_x, te_y, seed=seed)
    for r in out.values():  # every accuracy carries its uncertainty
        r["top1_ci95"] = list(wilson(round(r["top1"] * r["n_test"]), r["n_test"]))
    return out


def open_store(store_dir: Path | str) -> EmbeddingStore:
    store = EmbeddingStore(store_dir)
    if store.missing():
        raise StoreError(f"{store.root}: {len(store.missing())} of {store.info.num_shards} shards are not "
                         f"committed; finish the extraction first (the launcher: --stages extract,evaluate)")
    return store


def evaluate_store(store_dir: Path | str, *, features: Sequence[str] = ("cls",), train_split: str = "train",
                   test_split: str = "val", knn_k: int = 20, knn_temperature: float = 0.07, probe: bool = True,
                   seed: int = 0) -> dict[str, dict[str, Any]]:
    """{"<feature>/knn": ..., "<feature>/linear_probe": ...} on a store's train and test splits."""
    store = open_store(store_dir)
    dropped = {train_split: left_out(store, train_split), test_split: left_out(store, test_split)}
    results: dict[str, dict[str, Any]] = {}
    for feature in features:
        tr = load_split(store, feature, train_split)
        te = load_split(store, feature, test_split)
        for method, r in evaluate_arrays(*tr, *te, knn_k=knn_k, knn_temperature=knn_temperature, probe=probe,
                                         seed=seed).items():
            results[f"{feature}/{method}"] = {**r, "left_out": dropped}
    if any(dropped.values()):
        print(f"[cratescale] evaluate: left out {dropped[train_split]} {train_split} and {dropped[test_split]} "
              f"{test_split} rows whose image could not be decoded at extraction (valid=False in "
              f"{store.root / 'metadata'})", flush=True)
    return results


def evaluate_pixels(store_dir: Path | str, manifest_path: Path | str, image_size: int, *, loader_kind: str = "auto",
                    train_split: str = "train", test_split: str = "val", **protocol) -> dict[str, dict[str, Any]]:
    """{"pixels/knn": ..., "pixels/linear_probe": ...}: raw pixels at the model's input size, same rows."""
    store = open_store(store_dir)
    tr_x, tr_y, tr_bad = load_pixels(store, manifest_path, train_split, image_size, loader_kind)
    te_x, te_y, te_bad = load_pixels(store, manifest_path, test_split, image_size, loader_kind)
    out = evaluate_arrays(tr_x, tr_y, te_x, te_y, **protocol)
    return {f"pixels/{m}": {**r, "image_size": image_size, "replaced_rows": tr_bad + te_bad} for m, r in out.items()}


def layer_features(store: EmbeddingStore, pool: str) -> dict[int, str]:
    """{layer (1-based, as the diagnostics plot them): stored feature name} for every stored layer."""
    found = {}
    for name in store.info.dims:
        parts = name.split("_")
        if len(parts) == 3 and parts[0] == "layer" and parts[2] == pool and parts[1].isdigit():
            found[int(parts[1]) + 1] = name
    return dict(sorted(found.items()))


def evaluate_layers(store_dir: Path | str, pool: str, **protocol) -> dict[int, dict[str, dict[str, Any]]]:
    """{layer: {"knn": ..., "linear_probe": ...}} on every stored layer's `pool`-pooled output."""
    out = {}
    for layer, name in layer_features(open_store(store_dir), pool).items():
        out[layer] = {k.split("/", 1)[1]: v for k, v in evaluate_store(store_dir, features=[name], **protocol).items()}
    return out


def compare(results: Mapping[str, Mapping[str, Any]], baselines: Mapping[str, Mapping[str, Mapping[str, Any]]]
            ) -> dict[str, dict[str, float | None]]:
    """{"<feature>/<method>": {"pretrained", "init", "pixels" top-1 (%), "vs_init", "vs_pixels" (points)}}:
    init is matched on the same feature, pixels on the same method."""
    table = {}
    for name, r in results.items():
        method = name.split("/", 1)[1]
        row: dict[str, float | None] = {"pretrained": 100 * r["top1"]}
        for model, key in (("init", name), ("pixels", f"pixels/{method}")):
            other = baselines.get(model, {}).get(key)
            row[model] = None if other is None else 100 * other["top1"]
            row[f"vs_{model}"] = None if other is None else row["pretrained"] - row[model]
        table[name] = row
    return table


def best_layer(layers: Mapping[int, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any] | None:
    """The layer with the highest probe top-1 (kNN when there is no probe); ties go to the earlier layer."""
    if not layers:
        return None
    method = "linear_probe" if all("linear_probe" in v for v in layers.values()) else "knn"
    layer = max(layers, key=lambda i: (layers[i][method]["top1"], -i))
    return {"layer": int(layer), "method": method, "top1": layers[layer][method]["top1"]}
