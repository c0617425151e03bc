"""The stages after pretraining: extract embeddings (Ray actors) and evaluate them (probe, kNN, diagnostics)."""
from __future__ import annotations

import json
from pathlib import Path

from cratescale.config import ConfigError, JobConfig
from cratescale.launch.paths import RunPaths
from cratescale.launch.stages import StageError, console


def transfer_manifests(job: JobConfig, paths: RunPaths) -> dict[str, Path]:
    """name -> manifest of each transfer set, ingested on first use; a source that does not ingest is one line."""
    from data_pipeline.ingest import IngestError, ingest
    from data_pipeline.manifest import ManifestError
    from data_pipeline.sources import SourceError

    manifests = {}
    for i, dataset in enumerate(job.extract.datasets):
        root = paths.run_dir / "transfer" / dataset.name
        manifest = root / "manifest.parquet"
        if not manifest.exists():
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


def run_extract(job: JobConfig, paths: RunPaths) -> None:
    from cratescale.embeddings.extract import ExtractionError, extract

    if not (paths.export / "export.json").exists():
        raise StageError(f"extract: no export in {paths.export} (run the export stage first)")
    ex = job.extract
    for name, manifest in _datasets(job, paths).items():
        try:
            store = extract(paths.export, manifest, paths.embeddings / name, features=ex.features, layers=ex.layers,
                            dtype=ex.dtype, batch_size=ex.batch_size, actors=ex.actors,
                            image_size=job.data.image_size, loader_kind=job.data.loader,
                            ray_address=job.cluster.ray_address, shard_rows=ex.shard_rows,
                            num_gpus_per_actor=ex.gpus_per_actor, max_restarts=ex.max_restarts,
                            threads_per_actor=job.data.num_threads, loader_options=loader_options(job))
        except ExtractionError as err:  # one line: the cause and the knobs; committed shards are kept
            raise StageError(f"{name}: {err}") from None
        console.log(f"extract: {name} -> {store}")


def run_evaluate(job: JobConfig, paths: RunPaths) -> None:
    from cratescale.evaluation.report import evaluate

    summary = {}
    for name, manifest in _datasets(job, paths).items():
        out = paths.report / name
        written = evaluate(paths.export, paths.embeddings / name, manifest, out,
                           features=[job.evaluate.feature], knn_k=job.evaluate.knn_k,
                           knn_temperature=job.evaluate.knn_temperature, probe=job.evaluate.probe,
                           diagnostics=job.evaluate.diagnostics, diagnostic_images=job.evaluate.diagnostic_images,
                           image_size=job.data.image_size, loader_kind=job.data.loader, seed=job.seed)
        summary[name] = {key: str(path) for key, path in written.items()}
        table = out / "results.md"
        if table.exists():
            console.print(f"[bold]{name}[/bold]\n" + table.read_text())
    (paths.report).mkdir(parents=True, exist_ok=True)
    (paths.report / "index.json").write_text(json.dumps(summary, indent=1))
    console.log(f"evaluate: report in {paths.report}")
