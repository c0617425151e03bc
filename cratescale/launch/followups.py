"""The stages after pretraining: extract embeddings (Ray actors) and evaluate them (probe, kNN, diagnostics)."""
from __future__ import annotations

import json
from pathlib import Path

from cratescale.config import ConfigError, JobConfig, RunPaths
from cratescale.launch.display import StageError, console


def transfer_manifests(job: JobConfig, paths: RunPaths) -> dict[str, Path]:
    """name -> manifest of each transfer set, ingested on first use; a source that does not ingest is one line."""
    from data_pipeline.ingest import IngestError, ingest, ingest_settings
    from data_pipeline.manifest import ManifestError, manifest_action
    from data_pipeline.work import SHARD_SIZE
    from data_pipeline.sources import SourceError

    manifests = {}
    for i, dataset in enumerate(job.extract.datasets):
        root = paths.run_dir / "transfer" / dataset.name
        manifest = root / "manifest.parquet"
        # Made again when the set's source or val_per_class changed (it is small: no re-split, no rebase).
        if manifest_action(manifest, dataset.source, root,
                           ingest_settings(reshard=None, shard_size=SHARD_SIZE,
                                           val_per_class=dataset.val_per_class))[0] != "keep":
            if "://" not in dataset.source and not Path(dataset.source).exists():
                raise ConfigError(f"extract.datasets.{i}.source: {dataset.source} does not exist")
            try:
                ingest(dataset.source, root, val_per_class=dataset.val_per_class)
            except (IngestError, ManifestError, SourceError) as err:
                raise ConfigError(f"extract.datasets.{i}.source: {dataset.source} does not ingest: {err}") from None
        manifests[dataset.name] = manifest
    return manifests


def _datasets(job: JobConfig, paths: RunPaths) -> dict[str, Path]:
    """name -> manifest: the pretraining data itself, or each named transfer set."""
    return transfer_manifests(job, paths) if job.extract.datasets else {"pretrain": paths.manifest}


def loader_options(job: JobConfig) -> dict:
    """The job's data settings for the eval/extraction loaders (as training takes them)."""
    data = job.data
    return {"num_threads": data.num_threads, "py_workers": data.feed_workers, "hw_decoder_load": data.hw_decoder_load,
            "prefetch_depth": data.prefetch_depth}


def init_store(paths: RunPaths, name: str) -> Path:
    """Where the initialization baseline's embeddings of dataset `name` live."""
    return paths.embeddings / f"{name}.init"


def write_init_export(job: JobConfig, paths: RunPaths) -> Path:
    """The architecture at its initialization (the trainer's build_model, same seed) as an export."""
    from cratescale.checkpoint.export import export_weights
    from cratescale.engine.model_build import build_model

    if not (paths.init_export / "export.json").exists():
        model = build_model(job)
        export_weights(model.state_dict(), model.config, {"run": job.name, "step": 0, "init": True,
                                                          "seed": job.seed}, paths.init_export, overwrite=True)
    return paths.init_export


def run_extract(job: JobConfig, paths: RunPaths) -> None:
    from cratescale.checkpoint.export import read_export_header
    from cratescale.embeddings.extract import ExtractionError, extract

    if not (paths.export / "export.json").exists():
        raise StageError(f"extract: no export in {paths.export} (run the export stage first)")
    ex = job.extract
    layers = list(ex.layers)
    if job.evaluate.layers:  # every encoder layer, for the per-layer probes
        layers += range(int(read_export_header(paths.export)["model_config"]["depth"]))
    exports = {"": paths.export}
    if "init" in job.evaluate.baselines:
        exports["init"] = write_init_export(job, paths)
    for name, manifest in _datasets(job, paths).items():
        for which, export in exports.items():
            out = init_store(paths, name) if which else paths.embeddings / name
            try:
                store = extract(export, manifest, out, features=ex.features, layers=layers, dtype=ex.dtype,
                                batch_size=ex.batch_size, actors=ex.actors, image_size=job.data.image_size,
                                loader_kind=job.data.loader, ray_address=job.cluster.ray_address,
                                shard_rows=ex.shard_rows, num_gpus_per_actor=ex.gpus_per_actor,
                                max_restarts=ex.max_restarts, threads_per_actor=job.data.num_threads,
                                loader_options=loader_options(job))
            except ExtractionError as err:  # one line: the cause and the knobs; committed shards are kept
                raise StageError(f"{name}{' (init)' if which else ''}: {err}") from None
            console.log(f"extract: {name}{' (init)' if which else ''} -> {store}")


def run_evaluate(job: JobConfig, paths: RunPaths) -> None:
    from cratescale.evaluation.report import evaluate

    summary = {}
    for name, manifest in _datasets(job, paths).items():
        out = paths.report / name
        init = "init" in job.evaluate.baselines
        written = evaluate(paths.export, paths.embeddings / name, manifest, out,
                           features=[job.evaluate.feature], knn_k=job.evaluate.knn_k,
                           knn_temperature=job.evaluate.knn_temperature, probe=job.evaluate.probe,
                           diagnostics=job.evaluate.diagnostics, diagnostic_images=job.evaluate.diagnostic_images,
                           image_size=job.data.image_size, loader_kind=job.data.loader, seed=job.seed,
                           init_export=paths.init_export if init else None,
                           init_store=init_store(paths, name) if init else None,
                           pixels="pixels" in job.evaluate.baselines, layers=job.evaluate.layers)
        summary[name] = {key: str(path) for key, path in written.items()}
        table = out / "results.md"
        if table.exists():
            console.print(f"[bold]{name}[/bold]\n" + table.read_text())
    (paths.report).mkdir(parents=True, exist_ok=True)
    (paths.report / "index.json").write_text(json.dumps(summary, indent=1))
    console.log(f"evaluate: report in {paths.report}")
