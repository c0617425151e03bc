"""The stages after pretraining: extract embeddings (Ray actors) and evaluate them (probe, kNN, diagnostics)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from cratescale.config import ConfigError, JobConfig, RunPaths
from cratescale.embeddings.store import StoreError
from cratescale.files import replace_durable
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


def dataset_manifests(job: JobConfig, paths: RunPaths) -> dict[str, Path]:
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

    if not (paths.export / "export.json").exists():
        raise StageError(f"extract: no export in {paths.export} (run the export stage first)")
    layers = list(job.extract.layers)
    if job.evaluate.layers:  # every encoder layer, for the per-layer probes
        layers += range(int(read_export_header(paths.export)["model_config"]["depth"]))
    exports = {"": paths.export}
    if "init" in job.evaluate.baselines:
        exports["init"] = write_init_export(job, paths)
    for name, manifest in dataset_manifests(job, paths).items():
        for which, export in exports.items():
            out = init_store(paths, name) if which else paths.embeddings / name
            _extract_one(job, f"{name}{' (init)' if which else ''}", export, manifest, out, layers)


def _extract_one(job: JobConfig, label: str, export: Path, manifest: Path, out: Path, layers: list[int]) -> None:
    """Fill the store `out`: resumed where it is of this export and manifest, skipped where it is complete, and
    made again beside it (`<out>.next`, swapped in once complete) where an earlier export or manifest made it."""
    from cratescale.embeddings.extract import ExtractionError, extract, stale_reason
    from cratescale.embeddings.store import EmbeddingStore
    from cratescale.files import swap_in_dir

    ex = job.extract
    layout = dict(features=ex.features, layers=layers, dtype=ex.dtype, shard_rows=ex.shard_rows,
                  chunk_rows=1024, split=None)  # the layout extract() makes by default
    target = out
    if why := stale_reason(out, export, manifest, **layout):
        target = out.with_name(f"{out.name}.next")
        if stale_reason(target, export, manifest, **layout):  # an export that was itself replaced since
            shutil.rmtree(target)
        console.log(f"extract: {label}: {out} was {why}: extracting again into {target.name}")
    elif (out / "store.json").is_file() and EmbeddingStore(out).is_complete():
        console.log(f"extract: {label}: {out} is complete for this export and manifest, skipping")
        return
    try:
        extract(export, manifest, target, **layout, batch_size=ex.batch_size, actors=ex.actors,
                image_size=job.data.image_size, loader_kind=job.data.loader, ray_address=job.cluster.ray_address,
                num_gpus_per_actor=ex.gpus_per_actor, max_restarts=ex.max_restarts,
                threads_per_actor=job.data.num_threads, loader_options=loader_options(job))
    except ExtractionError as err:  # one line: the cause and the knobs; committed shards are kept
        raise StageError(f"{label}: {err}") from None
    if target != out:
        swap_in_dir(target, out)
    console.log(f"extract: {label} -> {out}")


REPORT_INPUTS = "inputs.json"  # what a report was made from, written once the report is complete


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def report_inputs(job: JobConfig, paths: RunPaths, name: str, manifest: Path) -> dict:
    """What a report of dataset `name` depends on: the exports and stores it reads (their headers carry their
    fingerprints, a new export or a re-extracted store changes them), the fine-tuned arms' exports, the manifest
    and the evaluate settings."""
    from cratescale.checkpoint.export import read_export_header
    from data_pipeline.manifest import manifest_fingerprint

    digest = hashlib.sha256(job.evaluate.model_dump_json().encode())
    digest.update(f"{job.data.image_size} {job.data.loader} {job.seed} {manifest_fingerprint(manifest)}".encode())
    finetuned = [paths.finetune / name / arm / "export" / "export.json" for arm in job.finetune.arms]
    for path in (paths.export / "export.json", paths.embeddings / name / "store.json",
                 paths.init_export / "export.json", init_store(paths, name) / "store.json", *finetuned):
        digest.update(path.read_bytes() if path.is_file() else b"absent")
    return {"export_step": read_export_header(paths.export)["provenance"].get("step"), "key": digest.hexdigest()}


def _evaluate_one(job: JobConfig, paths: RunPaths, name: str, manifest: Path, out: Path, init: bool) -> dict:
    """The report of one set; StoreError where a store it reads is missing, unfinished or damaged."""
    from cratescale.evaluation.finetune_report import read_curves
    from cratescale.evaluation.report import evaluate

    store = paths.embeddings / name
    if not (store / "store.json").is_file():
        raise StoreError(f"no embedding store {store}; run the extract stage first (--stages extract,evaluate)")
    return evaluate(paths.export, store, manifest, out, features=[job.evaluate.feature], knn_k=job.evaluate.knn_k,
                    knn_temperature=job.evaluate.knn_temperature, probe=job.evaluate.probe,
                    diagnostics=job.evaluate.diagnostics, diagnostic_images=job.evaluate.diagnostic_images,
                    image_size=job.data.image_size, loader_kind=job.data.loader, seed=job.seed,
                    init_export=paths.init_export if init else None,
                    init_store=init_store(paths, name) if init else None,
                    pixels="pixels" in job.evaluate.baselines, layers=job.evaluate.layers,
                    finetune=read_curves(paths.finetune, name),
                    progress=lambda what: console.log(f"evaluate: {name}: {what}"))


def run_evaluate(job: JobConfig, paths: RunPaths) -> None:
    summary = {}
    for name, manifest in dataset_manifests(job, paths).items():
        out = paths.report / name
        init = "init" in job.evaluate.baselines
        inputs = report_inputs(job, paths, name, manifest)
        if _read_json(out / REPORT_INPUTS) == inputs:
            console.log(f"evaluate: {name}: its inputs did not change (export step {inputs['export_step']}), "
                        f"skipping; report in {out}")
            summary[name] = (_read_json(paths.report / "index.json") or {}).get(name, {})
            continue
        (out / REPORT_INPUTS).unlink(missing_ok=True)  # a report killed half-rewritten is never taken as current
        try:
            written = _evaluate_one(job, paths, name, manifest, out, init)
        except StoreError as err:  # no store, an unfinished or a damaged one: what to run, on one line
            raise StageError(f"evaluate: {name}: {err}") from None
        summary[name] = {key: str(path) for key, path in written.items()}
        replace_durable(out / REPORT_INPUTS, json.dumps(inputs, indent=1))
        table = out / "results.md"
        if table.exists():
            console.print(f"[bold]{name}[/bold]\n" + table.read_text())
    (paths.report).mkdir(parents=True, exist_ok=True)
    (paths.report / "index.json").write_text(json.dumps(summary, indent=1))
    console.log(f"evaluate: report in {paths.report}")


def compare_members(members: list[tuple[JobConfig, RunPaths]], paths: RunPaths) -> None:
    """An array's members side by side, per transfer set: `<run_dir>/report/<set>/compare.{md,json,png}`."""
    from cratescale.evaluation.compare_report import write_compare

    first, first_paths = members[0]
    for name in dataset_manifests(first, first_paths):
        written = write_compare([member_paths.run_dir for _, member_paths in members], paths.report / name, name)
        console.print(f"[bold]{name}: the array's members[/bold]\n" + written["compare.md"].read_text())
    console.log(f"evaluate: the members compared in {paths.report}")
