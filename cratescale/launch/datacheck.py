"""Preflight on the data, after ingest and before any job is queued (issue 14).

The config checks in run.preflight need no data; these need the manifests. A run that cannot train (no
full global batch of training samples, classes whose every sample went to `val`) or a transfer set that does
not ingest to a usable manifest stops here with one line and exit 2, not as N failing ranks on a cluster.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from cratescale.config import ConfigError, JobConfig, RunPaths


def split_counts(manifest: Path) -> tuple[int, int, int]:
    """(training samples, classes, classes without any training sample) of a manifest."""
    table = pq.read_table(manifest, columns=["label", "split"])
    labels = table.column("label").to_numpy()
    train = table.column("split").to_numpy(zero_copy_only=False) == "train"
    classes = set(labels.tolist())
    return int(train.sum()), len(classes), len(classes - set(labels[train].tolist()))


def job_ingest_settings(job: JobConfig) -> dict:
    """The ingest settings the job asks its manifest to be made with (compared with what the manifest records)."""
    from data_pipeline.ingest import ingest_settings

    data = job.data
    return ingest_settings(reshard=data.reshard, shard_size=data.shard_size, val_per_class=data.val_per_class)


def check_manifest(field: str, manifest: Path, val_per_class: int, min_train: int = 1) -> None:
    """One line naming `field` when the manifest has no rows, fewer than `min_train` training samples, or
    classes that its split emptied of training samples (the val_per_class it was made with, as it records it;
    `val_per_class` where it records none)."""
    from data_pipeline.manifest import manifest_info

    if not manifest.is_file():
        raise ConfigError(f"{field}: no manifest at {manifest} after ingest")
    val_per_class = (manifest_info(manifest).settings or {}).get("val_per_class", val_per_class)
    train, classes, emptied = split_counts(manifest)
    if classes == 0:
        raise ConfigError(f"{field}: {manifest} has no samples")
    if emptied:
        raise ConfigError(f"{field}: val_per_class {val_per_class} leaves {emptied} of {classes} classes without a "
                          f"training sample ({manifest}); lower val_per_class")
    if train < min_train:
        raise ConfigError(f"{field}: {train} training samples in {manifest}, fewer than one global batch "
                          f"({min_train}, schedule.global_batch); lower val_per_class or the global batch")


def check_heldout(job: JobConfig, manifest: Path) -> None:
    """The held-out loss needs a val split and whole parameters on each rank."""
    if job.parallel.zero_stage == 3:  # engine.module holds only this rank's partition of each parameter
        raise ConfigError("logging.heldout_every_steps: the held-out loss reads whole parameters on each rank; "
                          "parallel.zero_stage 3 is not supported there yet (use 0, 1 or 2)")
    from data_pipeline.manifest_index import count_split

    if count_split(manifest, "val") == 0:
        raise ConfigError(f"logging.heldout_every_steps: {manifest} has no val split to measure the held-out loss "
                          f"on; set data.val_per_class")


def check_data(job: JobConfig, paths: RunPaths, stages: list[str]) -> None:
    """Everything about the data that must hold before the first job is submitted; ingests transfer sets."""
    if "pretrain" in stages:
        check_manifest("data.val_per_class", paths.manifest, job.data.val_per_class, job.schedule.global_batch)
        if job.logging.heldout_every_steps is not None:
            check_heldout(job, paths.manifest)
    if job.finetune.enabled and "finetune" in stages:
        from cratescale.launch.finetune_stage import check_transfer_set
        from cratescale.launch.followups import dataset_manifests

        if job.parallel.zero_stage == 3:  # engine.module holds only this rank's partition of each parameter
            raise ConfigError("parallel.zero_stage: the finetune stage's top-1 evaluation reads whole parameters on "
                              "each rank; stage 3 is not supported there yet (use 0, 1 or 2)")
        for name, manifest in dataset_manifests(job, paths).items():
            check_transfer_set(name, manifest, job.finetune.global_batch)
    if job.extract.datasets and ({"extract", "evaluate"} & set(stages)):
        from cratescale.launch.followups import transfer_manifests

        for i, (dataset, manifest) in enumerate(zip(job.extract.datasets, transfer_manifests(job, paths).values())):
            check_manifest(f"extract.datasets.{i}.val_per_class", manifest, dataset.val_per_class)
