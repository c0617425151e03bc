"""Top-1 of a fine-tuned (classifier) export on a labelled image folder (class folders), through the eval loader.

The folder is ingested inline (no Ray) into a manifest in a work directory (a temporary one unless given), read by
data_pipeline's eval loader (resize to image_size*256/224 on the short side, centre crop, as extraction reads
images), and every decodable image is classified. A folder's classes are matched to the export's class names by
name, so a folder may hold any subset of them, in any order; a class the export does not know is an error.
"""
from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cratescale.checkpoint.classifier_export import load_classifier
from cratescale.checkpoint.export import ExportError
from cratescale.models import Classifier


class PredictError(ValueError):
    """Input predict cannot use: a missing export or folder, a non-classifier export, an unknown class."""


def _open(export: Path | str) -> Classifier:
    try:
        return load_classifier(export)[0]
    except (FileNotFoundError, ExportError) as exc:
        raise PredictError(str(exc)) from None


def label_map(manifest: Path, class_names: list[str]) -> tuple[np.ndarray, list[str]]:
    """(export class index of each manifest label, the folder's class names in label order); a folder class the
    export does not know is a PredictError naming it."""
    import pandas as pd

    table = pd.read_parquet(manifest, columns=["label", "class_name"]).drop_duplicates().sort_values("label")
    known = {name: i for i, name in enumerate(class_names)}
    unknown = [c for c in table.class_name if c not in known]
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise PredictError(f"predict: class folder(s) {shown} not among the export's {len(class_names)} classes "
                           f"({', '.join(class_names[:10])}{' ...' if len(class_names) > 10 else ''})")
    to_export = np.full(int(table.label.max()) + 1, -1, dtype=np.int64)
    to_export[table.label.to_numpy()] = [known[c] for c in table.class_name]
    return to_export, list(table.class_name)


def _ingest(folder: Path, work: Path, temporary: bool) -> tuple[Path, int]:
    from data_pipeline.ingest import IngestError, run_ingest

    try:
        result = run_ingest(str(folder), work, workers=0, progress=False)
    except (IngestError, ValueError) as exc:  # SourceError, ManifestError are ValueErrors
        keep = " (its files are removed: --work-dir keeps them)" if temporary else ""
        raise PredictError(f"predict: {folder} does not ingest: {' '.join(str(exc).split())}{keep}") from None
    return result.manifest, result.rejected_count


@torch.no_grad()
def top1(model: Classifier, manifest: Path, to_export: np.ndarray, batch_size: int = 64,
         loader: str = "auto") -> dict[str, Any]:
    """{"top1", "n", "correct", "undecodable"} over every manifest row the loader decodes."""
    from data_pipeline.loader import make_eval_loader
    from data_pipeline.manifest_index import ManifestArrays

    rows = np.arange(ManifestArrays(manifest, None).total_rows)
    correct = n = 0
    batches = make_eval_loader(manifest, rows, batch_size, model.img_size, kind=loader, device="cpu")
    try:
        for batch in batches:
            valid = batch["valid"].numpy().astype(bool)
            predicted = model(batch["images"].float()).argmax(dim=-1).numpy()
            truth = to_export[batch["labels"].numpy()]
            correct += int((predicted[valid] == truth[valid]).sum())
            n += int(valid.sum())
        bad = batches.bad_samples
    finally:
        batches.close()
    return {"top1": correct / n if n else 0.0, "n": n, "correct": correct, "undecodable": bad}


def predict(export: Path | str, folder: Path | str, *, work_dir: Path | str | None = None, batch_size: int = 64,
            loader: str = "auto") -> dict[str, Any]:
    """Top-1 of `export` on `folder`: {"top1", "n", "correct", "undecodable", "rejected", "classes"}. Bad input is
    one PredictError line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PredictError(f"predict: {folder} is not a folder (expected class folders of images)")
    model = _open(export)
    with ExitStack() as stack:
        work = Path(work_dir) if work_dir is not None else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="cratescale-predict-")))
        manifest, rejected = _ingest(folder, work, temporary=work_dir is None)
        to_export, classes = label_map(manifest, model.class_names)
        result = top1(model, manifest, to_export, batch_size, loader)
    if result["n"] == 0:
        raise PredictError(f"predict: no image of {folder} decodes")
    return {**result, "rejected": rejected, "classes": classes}
