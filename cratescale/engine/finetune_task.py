"""Fine-tuning as a training task (engine/task.py): the classifier of one arm on a labelled transfer set, MAE's
recipe (engine/finetune_recipe.py), top-1 on the set's val split every `finetune.eval_every_steps`.

The trainer runs it as it runs pretraining (DeepSpeed ZeRO, commits, preemption, exact resume). Its job is the
fine-tune run's job (launch/finetune_stage.py `finetune_job`): `schedule`, `optim` and `seed` hold the fine-tune's
batches, length, learning rate, betas and clipping, so only what differs from pretraining is here.

Every random draw of a micro-batch (drop path, from torch's global RNG; mixup / cutmix, from their own generator)
is seeded by (seed, step, the micro-batch's first sample id), not by rank: the same images get the same draws on
any world size with the same micro-batch, so a resume continues the uninterrupted run's draws, also an elastic one
(2 -> 1 ranks: one rank accumulates the two micro-batches that two ranks took). No RNG state beyond the commit's.
"""
from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cratescale.checkpoint.classifier_export import classifier_from_export
from cratescale.checkpoint.export import export_fingerprint, read_export_header
from cratescale.config import JobConfig
from cratescale.config.identity import IDENTITY_VERSION
from cratescale.engine.finetune_recipe import finetune_loss, mix, param_groups_lrd
from cratescale.engine.heldout import rank_val_rows, seed_of, summed_over_ranks, val_batches
from cratescale.models.classifier import Classifier, scratch_classifier
from data_pipeline.manifest import manifest_fingerprint

ARMS = ("pretrained", "scratch")
# finetune.* fields that only say how long, where or how often: a resume may change them (as the schedule's length
# for pretraining); every other field is what the training continues with.
_NOT_IDENTITY = {"enabled", "arms", "steps", "epochs", "micro_batch", "warmup_steps", "warmup_epochs",
                 "eval_every_steps"}


@dataclass(frozen=True)
class FinetuneSpec:
    """What a fine-tune run trains beyond its job: the arm, the transfer set, the pretraining export (the pretrained
    arm's weights; both arms' architecture) and the class names in label order. Pickled with the rank task."""
    arm: str
    set_name: str
    export: str
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.arm not in ARMS:
            raise ValueError(f"finetune: arm {self.arm!r} is not one of {ARMS}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "class_names": list(self.class_names)}


def manifest_class_names(manifest: Path) -> tuple[str, ...]:
    """The class names of a manifest in label order (labels are 0..n-1, one per class name)."""
    import pyarrow.parquet as pq

    table = pq.read_table(manifest, columns=["label", "class_name"]).to_pandas().drop_duplicates()
    table = table.sort_values("label")
    if list(table["label"]) != list(range(len(table))):
        raise ValueError(f"{manifest}: labels are not 0..{len(table) - 1}, one per class name")
    return tuple(str(c) for c in table["class_name"])


def build_classifier(spec: FinetuneSpec, job: JobConfig) -> Classifier:
    """The arm's starting point: the export's encoder (pretrained) or the same architecture built after
    torch.manual_seed(seed), where pretraining started (scratch); both with the same head (seeded)."""
    ft, seed, n = job.finetune, job.seed, len(spec.class_names)
    if spec.arm == "pretrained":
        return classifier_from_export(spec.export, n, list(spec.class_names), ft.drop_path, head_seed=seed)
    encoder = read_export_header(spec.export)["model_config"]
    return scratch_classifier(encoder, n, list(spec.class_names), ft.drop_path, seed)


def weight_digest(model: torch.nn.Module) -> dict[str, int]:
    """crc32 of each tensor's fp32 bytes: which weights a run started from, comparable with any state dict."""
    return {name: zlib.crc32(t.detach().float().cpu().contiguous().numpy().tobytes())
            for name, t in model.state_dict().items()}


class FinetuneTask:
    """One arm of one transfer set; `job` is the fine-tune run's job, `manifest` the transfer set's."""

    def __init__(self, job: JobConfig, manifest: Path, spec: FinetuneSpec) -> None:
        self.job, self.manifest, self.spec = job, Path(manifest), spec
        self.floor_lr = job.finetune.min_lr

    def identity(self) -> dict[str, Any]:
        fields = {f"finetune.{k}": v for k, v in self.job.finetune.model_dump(mode="json").items()
                  if k not in _NOT_IDENTITY}
        # The scratch arm reads only the export's architecture: a re-run pretraining does not change its training.
        start = export_fingerprint(self.spec.export) if self.spec.arm == "pretrained" else \
            read_export_header(self.spec.export)["model_config"]
        fields.update({"seed": self.job.seed, "arm": self.spec.arm, "start": start,
                       "class_names": list(self.spec.class_names), "image_size": self.job.data.image_size})
        return {"version": IDENTITY_VERSION, "fields": fields, "manifest": manifest_fingerprint(self.manifest)}

    def build_model(self, fresh: bool, rank: int) -> torch.nn.Module:
        return build_classifier(self.spec, self.job)

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        return param_groups_lrd(model, self.job.finetune.weight_decay, self.job.finetune.layer_decay)

    def loss(self, engine: Any, batch: dict, images: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        ft = self.job.finetune
        targets = batch["labels"].to(engine.device, torch.long, non_blocking=True)
        first_sample = int(batch["sample_ids"][0])
        torch.manual_seed(seed_of(self.job.seed, step, first_sample))  # drop path's draws in this forward
        if ft.mixup > 0 or ft.cutmix > 0:
            generator = torch.Generator().manual_seed(seed_of(self.job.seed, step, first_sample, 1))
            images, targets, _ = mix(images, targets, len(self.spec.class_names), generator, ft.mixup, ft.cutmix,
                                     ft.label_smoothing)
        return finetune_loss(engine(images), targets, ft.label_smoothing)

    def start_record(self, model: torch.nn.Module, fresh: bool) -> dict[str, Any] | None:
        """The weights this run started from (a fresh start only: a resume continues a commit's)."""
        if not fresh:
            return None
        return {"kind": "finetune_start", "arm": self.spec.arm, "set": self.spec.set_name,
                "export": self.spec.export, "weights_crc32": weight_digest(model)}

    def eval_due(self, step: int, total: int) -> bool:
        every = self.job.finetune.eval_every_steps
        return step == total or (every is not None and step % every == 0)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, step: int, decoder: Any, world_size: int, rank: int) -> dict:
        """Top-1 over the val split, each rank a strided share of its rows, summed over ranks. The model is put in
        eval mode (no drop path: the RNG streams are not touched) and back in training mode."""
        correct = total = 0
        device = next(model.parameters()).device
        for images, labels, _ in val_batches(model, self.manifest, rank_val_rows(self.manifest, rank, world_size),
                                             self.job.finetune.micro_batch, self.job.data.image_size, decoder,
                                             self.job.data.num_threads):
            correct += int((model(images.to(device)).argmax(dim=-1).cpu() == labels).sum())
            total += len(labels)
        correct, total = (int(v) for v in summed_over_ranks([correct, total]))
        return {"kind": "eval", "step": step, "arm": self.spec.arm, "set": self.spec.set_name,
                "top1": correct / total if total else float("nan"), "n": total}
