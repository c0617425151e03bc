"""The K nearest rows of a store to one of its rows or to a new image, and a picture of them for a person.

A row's own vector is its query (the row itself is left out of its neighbours). An image is encoded by the
export the store records (store.json provenance: its path and export.json's sha256, checked) after the
extraction's eval view (data_pipeline: centre crop, resize, ImageNet normalisation), on the CPU. Labels and
pictures come from the manifest the store records (source.manifest); a store whose manifest has moved still
answers, with label numbers and without pictures of its rows.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cratescale.embeddings.index import NeighbourIndex
from cratescale.embeddings.store import EmbeddingStore, StoreError, selected_rows


@dataclass(frozen=True)
class Neighbour:
    rank: int
    row: int
    sample_id: int
    key: str
    label: int
    name: str        # class name from the manifest, else the label number
    distance: float  # 1 - cosine similarity


class Samples:
    """Store rows -> manifest entries (bytes, class names) of the manifest the store was extracted from."""

    def __init__(self, store: EmbeddingStore):
        self.store, path = store, Path(store.info.source.get("manifest", ""))
        self.manifest: pd.DataFrame | None = None
        self.names: dict[int, str] = {}
        if path.is_file():
            m = pd.read_parquet(path, columns=["path", "offset", "size", "label", "class_name", "split"])
            rows = selected_rows(m, store.info.source.get("split"))
            if len(rows) == store.info.num_rows:  # else not the manifest it was built from: no pictures
                self.manifest = m.iloc[rows].reset_index(drop=True)
                first = self.manifest.drop_duplicates("label")
                self.names = dict(zip(first.label.astype(int), first.class_name.astype(str)))
        self.meta = store.metadata().set_index("row")

    def name(self, label: int) -> str:
        return self.names.get(int(label), str(label))

    def image(self, row: int) -> np.ndarray | None:
        """The row's image as stored (HWC uint8 RGB), None without its manifest or bytes."""
        if self.manifest is None:
            return None
        e = self.manifest.iloc[row]
        try:
            with open(e["path"], "rb") as f:
                if e["offset"] >= 0:  # a tar member
                    f.seek(int(e["offset"]))
                data = f.read(int(e["size"]) if e["offset"] >= 0 else -1)
            return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        except (OSError, ValueError):
            return None

    def neighbours(self, dist: np.ndarray, rows: np.ndarray) -> list[Neighbour]:
        out = []
        for d, r in zip(dist, rows):
            if r < 0:
                continue
            m = self.meta.loc[int(r)]
            out.append(Neighbour(len(out) + 1, int(r), int(m.sample_id), str(m.key), int(m.label),
                                 self.name(int(m.label)), float(d)))
        return out


def by_row(index: NeighbourIndex, samples: Samples, row: int, k: int) -> list[Neighbour]:
    """The k nearest other rows to stored row `row`."""
    store = index.store
    if not 0 <= row < store.info.num_rows:
        raise StoreError(f"{store.root}: --row {row} is outside [0, {store.info.num_rows})")
    query = store.read(index.feature, np.array([row]))
    if np.isnan(query).any():
        raise StoreError(f"{store.root}: row {row} has no features (its image did not decode, or its shard is "
                         f"not committed)")
    dist, rows = index.search(query, k + 1)
    keep = rows[0] != row
    return samples.neighbours(dist[0][keep][:k], rows[0][keep][:k])


def encode_image(store: EmbeddingStore, feature: str, path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """(feature vector (d,), the encoder's input view as HWC uint8) of an image file, by the store's export."""
    import torch

    from cratescale.checkpoint.export import export_fingerprint, load_model
    from cratescale.embeddings.extract import pooled_features
    from data_pipeline.augment import center_window
    from data_pipeline.pil_loader import decode_window, normalize

    prov = store.info.provenance
    export = Path(prov.get("export", ""))
    if not (export / "export.json").is_file():
        raise StoreError(f"{store.root}: the export it was extracted with ({export}) is not there; --image needs it")
    if prov.get("fingerprint") and export_fingerprint(export) != prov["fingerprint"]:
        raise StoreError(f"{store.root}: the export at {export} is not the one it was extracted with (export.json "
                         f"differs); --image needs that one")
    match = re.fullmatch(r"(?:layer_(\d+)_)?(cls|mean)", feature)
    if match is None:
        raise StoreError(f"{store.root}: feature {feature!r} is not one the encoder gives")
    try:
        data = Path(path).read_bytes()
        w, h = Image.open(io.BytesIO(data)).size
    except (OSError, ValueError) as exc:
        raise StoreError(f"--image {path}: not a readable image ({type(exc).__name__})") from None
    model, _ = load_model(export)
    anchor, shape = center_window(np.array([w]), np.array([h]))
    view = decode_window(data, anchor[0], shape[0], 0, model.img_size)
    layers = [int(match.group(1))] if match.group(1) else []
    with torch.no_grad():
        out = model.encode(normalize(torch.from_numpy(np.array(view))[None]), layers=layers or None)
    return pooled_features(out, [match.group(2)], layers)[feature][0].numpy(), view


def by_image(index: NeighbourIndex, samples: Samples, path: Path | str, k: int) -> tuple[list[Neighbour], np.ndarray]:
    """The k nearest rows to a new image, and the view of it the encoder saw."""
    vector, view = encode_image(index.store, index.feature, path)
    dist, rows = index.search(vector[None], k)
    return samples.neighbours(dist[0], rows[0]), view


def picture(query: np.ndarray | None, title: str, found: list[Neighbour], samples: Samples, out: Path | str) -> Path:
    """One PNG: the query, then its neighbours, each with its label (and distance) under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiles = [(query, title)] + [(samples.image(n.row), f"{n.name}\nd={n.distance:.3f}") for n in found]
    cols = min(len(tiles), 11)
    lines = -(-len(tiles) // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(1.3 * cols, 1.6 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, label) in enumerate(tiles):
        ax = axes.flat[i]
        ax.imshow(image if image is not None else np.full((8, 8, 3), 200, np.uint8), interpolation="nearest")
        ax.set_title(label, fontsize=7, y=-0.4, color="tab:red" if i == 0 else "black")
    fig.subplots_adjust(wspace=0.1, hspace=0.6, bottom=0.2)
    out = Path(out)
    fig.savefig(out, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return out
