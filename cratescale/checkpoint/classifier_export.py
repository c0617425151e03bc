"""Fine-tuned classifiers in the project's export format (export.py: weights.zarr + export.json, no pickle).

A classifier export is an ordinary export whose model_config is the classifier's (models/classifier.py):
{"arch": "classifier", "encoder": <the MAE's config>, "num_classes", "class_names", "drop_path"}, so export.json
names the classes the logits stand for, in order. The pretrained arm starts from an MAE export
(`classifier_from_export`: encoder weights kept, decoder dropped).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from cratescale.checkpoint.export import ExportError, export_weights, load_export, load_model, read_export_header
from cratescale.models.classifier import ARCH, Classifier, classifier_from_config, from_encoder


def export_classifier(model: Classifier, provenance: dict[str, Any], out_dir: Path | str,
                      overwrite: bool = False) -> Path:
    """Write a classifier's fp32 weights and its config (class names included) as an export; returns out_dir."""
    if not isinstance(model, Classifier):
        raise TypeError(f"export_classifier: expected a Classifier, got {type(model).__name__}")
    return export_weights(model.state_dict(), model.config, provenance, out_dir, overwrite=overwrite)


def _kind(header: dict[str, Any]) -> str:
    config = header.get("model_config") or {}
    return str(config.get("arch") or config.get("name") or "unknown")


def load_classifier(out_dir: Path | str, device: str | torch.device = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """(classifier in eval mode, provenance + model_config) from a fine-tuned export. Not an export: FileNotFoundError;
    an export of another model (a pretrained MAE) or weights that do not fit: ExportError, one line each."""
    out = Path(out_dir)
    header = read_export_header(out)
    if _kind(header) != ARCH:
        raise ExportError(f"export: {out} holds a {_kind(header)} model, not a fine-tuned classifier "
                          f"(model_config.arch {ARCH!r}): predict needs the finetune stage's export")
    state, config, provenance = load_export(out)
    model = classifier_from_config(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"export: the weights in {out} do not fit its classifier config: "
                          + " ".join(str(exc).split())) from exc
    return model.eval().to(device), {"export": str(out.resolve()), **provenance, "model_config": config}


def classifier_from_export(export_dir: Path | str, num_classes: int, class_names: Sequence[str] | None = None,
                           drop_path: float = 0.0, head_seed: int = 0) -> Classifier:
    """The pretrained arm: a pretraining export's encoder (its weights; decoder, final norm and mask token left
    behind) under a fresh head, in training mode."""
    header = read_export_header(export_dir)
    if _kind(header) == ARCH:
        raise ExportError(f"export: {export_dir} is already a fine-tuned classifier; fine-tuning starts from a "
                          f"pretraining export")
    model, _ = load_model(export_dir)
    return from_encoder(model, num_classes, class_names, drop_path, head_seed)
