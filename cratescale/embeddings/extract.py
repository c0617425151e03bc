"""Encoder of an export over a manifest -> embedding store, with a pool of Ray actors (one model copy each).

Driver: create (or reopen) the store, list the shards without a commit marker, group them into tasks of a
few consecutive shards, and feed the tasks through
`ray.data.from_items(...).map_batches(ShardWorker, compute=ActorPoolStrategy(size=actors))`.
Each actor loads the export once (zarr + JSON, no pickle); for every task it decodes the task's rows with
ONE data_pipeline eval loader, runs `model.encode` under no_grad, and writes each shard whole, followed by
its commit marker, as soon as its rows are done. Work is partitioned by shard, so one zarr shard never has
two writers, and a killed run resumes at the first uncommitted shard. `actors=0` runs the same worker in
this process (no Ray).

Store row r holds manifest row `rows[r]`, where rows = manifest rows of `split` (all rows if None), in
manifest order.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from cratescale.checkpoint.export import load_export
from cratescale.embeddings.store import EmbeddingStore, StoreInfo
from cratescale.models import create_model, model_from_config

BASE_FEATURES = ("cls", "mean")
AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExtractionError(RuntimeError):
    """The extraction ended with shards still uncommitted."""


def load_model(export_dir: Path | str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, provenance) from an export directory."""
    state, config, provenance = load_export(export_dir)
    if "arch" in config:
        model = model_from_config(config)
    else:
        rest = {k: v for k, v in config.items() if k != "name"}
        model = create_model(config["name"], **rest)
    model.load_state_dict(state)
    return model.eval().to(device), {"export": str(Path(export_dir).resolve()), **provenance,
                                     "model_config": config}


def manifest_path_of(path: Path | str) -> Path:
    p = Path(path)
    p = p / "manifest.parquet" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"extract: manifest not found: {p}")
    return p


def selected_rows(manifest: pd.DataFrame, split: str | None) -> np.ndarray:
    if split is None:
        return np.arange(len(manifest), dtype=np.int64)
    return np.flatnonzero(manifest["split"].to_numpy() == split).astype(np.int64)


def feature_names(features: Sequence[str], layers: Sequence[int]) -> list[str]:
    bad = [f for f in features if f not in BASE_FEATURES]
    if bad or not features:
        raise ValueError(f"extract: features must be a non-empty subset of {BASE_FEATURES}, got {list(features)}")
    return [*features, *(f"layer_{i}_{f}" for i in layers for f in features)]


def _sample_keys(m: pd.DataFrame) -> list[str]:
    if "key" in m.columns:
        return m["key"].astype(str).tolist()
    return [p if o < 0 else f"{p}#{o}" for p, o in zip(m["path"], m["offset"])]


class ShardWorker:
    """Loads the model once; `run_shards(ks)` fills shards ks of the store. Also the Ray Data UDF."""

    def __init__(self, export_dir: str, manifest_path: str, store_dir: str, *, features: Sequence[str],
                 layers: Sequence[int], split: str | None, batch_size: int, image_size: int | None,
                 loader_kind: str, device: str = "auto", amp: str | None = None, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if device == "auto" else device))
        self.model, _ = load_model(export_dir, self.device)
        self.store = EmbeddingStore(store_dir)
        self.manifest_path = manifest_path
        # Only the columns the metadata needs (a 14M-row manifest is GBs in pandas with every column).
        has_key = "key" in pq.read_schema(manifest_path).names
        cols = ["sample_id", "label", "split"] + (["key"] if has_key else ["path", "offset"])
        self.meta = pd.read_parquet(manifest_path, columns=cols)
        self.rows = selected_rows(self.meta, split)
        self.features, self.layers = list(features), [int(i) for i in layers]
        self.batch_size, self.loader_kind = batch_size, loader_kind
        self.image_size = int(image_size or self.model.img_size)
        self.amp = AMP_DTYPES[amp]

    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feature name -> (B, d) float32 on the CPU."""
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                                             enabled=self.amp is not None):
            out = self.model.encode(images.to(self.device, non_blocking=True),
                                    layers=self.layers if self.layers else None)
        feats = {f: out[f] for f in self.features}
        for i, tokens in zip(self.layers, out.get("layers", [])):
            pooled = {"cls": tokens[:, 0], "mean": tokens[:, 1:].mean(dim=1)}
            feats.update({f"layer_{i}_{f}": pooled[f] for f in self.features})
        return {k: v.float().cpu() for k, v in feats.items()}

    def run_shards(self, ks: Sequence[int]) -> list[dict[str, Any]]:
        """Fill shards `ks` (skipping committed ones) from ONE loader over their rows: the loader's start-up
        (DALI spawns its feed workers) is paid once per task, not once per shard. Batches are re-cut at
        shard starts so every shard sees exactly the batches a lone run of it would: features do not
        depend on how shards were grouped, and a resumed store stays byte-identical."""
        from data_pipeline.loader import make_eval_loader

        done = self.store.committed()
        ks = [int(k) for k in ks if int(k) not in done]   # done by an earlier attempt of this task
        if not ks:
            return []
        spans = [self.store.info.shard_range(k) for k in ks]
        rows = np.concatenate([self.rows[a:b] for a, b in spans])
        loader = make_eval_loader(self.manifest_path, rows, self.batch_size, self.image_size,
                                  kind=self.loader_kind)
        records, parts, ids, t0, t_enc = [], {}, [], time.perf_counter(), 0.0
        try:
            for i, images, sample_ids, last in _shard_batches(loader, [b - a for a, b in spans],
                                                              self.batch_size):
                t = time.perf_counter()
                for name, v in self.encode(images).items():
                    parts.setdefault(name, []).append(v)
                t_enc += time.perf_counter() - t
                ids.append(sample_ids.cpu().numpy())
                if last:
                    records.append(self._commit(ks[i], spans[i], parts, np.concatenate(ids), t0, t_enc))
                    parts, ids, t0, t_enc = {}, [], time.perf_counter(), 0.0
        finally:
            loader.close()  # we stop at the last row, before the loader's own end-of-data close
        return records

    def run_shard(self, k: int) -> dict[str, Any] | None:
        records = self.run_shards([k])
        return records[0] if records else None

    def _commit(self, k: int, span: tuple[int, int], parts: dict, got: np.ndarray, t0: float,
                t_enc: float) -> dict:
        rows = self.rows[span[0]:span[1]]
        m = self.meta.iloc[rows]
        feats = {name: torch.cat(v).numpy() for name, v in parts.items()}
        metadata = pd.DataFrame({"sample_id": m["sample_id"].to_numpy(), "key": _sample_keys(m),
                                 "label": m["label"].to_numpy().astype(np.int32),
                                 "split": m["split"].astype(str).to_numpy()})
        self.store.write_shard(k, feats, metadata)
        return {"shard": k, "rows": len(rows), "seconds": time.perf_counter() - t0, "encode_seconds": t_enc,
                "replaced": int((got != m["sample_id"].to_numpy()).sum()), "pid": os.getpid(),
                "host": socket.gethostname()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data UDF: each input row is a task, "shards" = comma-separated shard indices."""
        records = [r for group in batch["shards"] for r in self.run_shards(_parse_group(group))]
        return {key: np.array([r[key] for r in records], dtype=_RECORD_DTYPES.get(key, np.int64))
                for key in RECORD_KEYS}


RECORD_KEYS = ("shard", "rows", "seconds", "encode_seconds", "replaced", "pid", "host")
_RECORD_DTYPES = {"seconds": np.float64, "encode_seconds": np.float64, "host": np.str_}


def _parse_group(group: Any) -> list[int]:
    return [int(k) for k in str(group).split(",") if k]


def _shard_batches(loader: Iterable[dict], lengths: Sequence[int], size: int):
    """Re-cut loader batches into batches of <= `size` that restart at every shard start and never cross a
    shard end. Yields (shard position, images, sample_ids, is_last_batch_of_shard)."""
    it = iter(loader)
    xs: list[torch.Tensor] = []
    sids: list[torch.Tensor] = []
    have = 0
    for i, n in enumerate(lengths):
        left = n
        while left:
            want = min(size, left)
            while have < want:
                try:
                    b = next(it)
                except StopIteration:
                    raise ExtractionError(f"extract: the loader ended {want - have} images early") from None
                xs.append(b["images"])
                sids.append(b["sample_ids"])
                have += len(b["images"])
            x, sid = torch.cat(xs), torch.cat(sids)
            left -= want
            yield i, x[:want], sid[:want], left == 0
            xs, sids, have = [x[want:]], [sid[want:]], have - want


def group_shards(todo: Sequence[int], actors: int, shards_per_task: int = 0) -> list[list[int]]:
    """Consecutive groups of uncommitted shards, one per task. Auto size: about two tasks per actor (load
    balance), at most 8 shards (a killed task loses little), at least 1."""
    if shards_per_task <= 0:
        shards_per_task = max(1, min(8, math.ceil(len(todo) / (2 * max(actors, 1)))))
    return [list(todo[i:i + shards_per_task]) for i in range(0, len(todo), shards_per_task)]


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def prepare_store(export_dir: Path | str, manifest_path: Path | str, store_dir: Path | str, *,
                  features: Sequence[str], layers: Sequence[int], dtype: str, shard_rows: int,
                  chunk_rows: int, split: str | None) -> EmbeddingStore:
    """Create the store (or reopen a matching one) from the export's config and the manifest."""
    manifest = manifest_path_of(manifest_path)
    header = read_export_header(export_dir)
    config, provenance = header["model_config"], header.get("provenance", {})
    n = len(selected_rows(pd.read_parquet(manifest, columns=["split"]), split))
    if n == 0:
        raise ValueError(f"extract: {manifest} has no rows of split {split!r}")
    d = int(config["embed_dim"])
    info = StoreInfo(num_rows=n, dims={name: d for name in feature_names(features, layers)}, dtype=dtype,
                     shard_rows=shard_rows, chunk_rows=min(chunk_rows, shard_rows),
                     source={"manifest": str(manifest.resolve()), "fingerprint": _fingerprint(manifest),
                             "split": split, "rows": n},
                     provenance={"export": str(Path(export_dir).resolve()), **provenance, "model_config": config,
                                 "fingerprint": _fingerprint(Path(export_dir) / "export.json")})
    return EmbeddingStore.create(store_dir, info)


def extract(export_dir: Path | str, manifest_path: Path | str, store_dir: Path | str, *,
            features: Sequence[str] = ("cls", "mean"), layers: Sequence[int] = (), dtype: str = "float16",
            batch_size: int = 64, actors: int = 2, image_size: int | None = None, loader_kind: str = "auto",
            ray_address: str | None = None, shard_rows: int = 4096, chunk_rows: int = 1024,
            split: str | None = None, num_cpus_per_actor: float = 0.5, num_gpus_per_actor: float = 0.0,
            amp: str | None = None, threads_per_actor: int | None = None, shards_per_task: int = 0) -> Path:
    """Fill `store_dir` with the export's encoder features for every selected manifest row; returns the
    store path. Reruns skip committed shards. On a GPU cluster: num_gpus_per_actor=1, amp="bf16"."""
    return run_extraction(**locals())[0]  # locals() here is exactly the argument dict


def run_extraction(export_dir: Path | str, manifest_path: Path | str, store_dir: Path | str, *,
                   features: Sequence[str], layers: Sequence[int], dtype: str, batch_size: int, actors: int,
                   image_size: int | None, loader_kind: str, ray_address: str | None, shard_rows: int,
                   chunk_rows: int, split: str | None, num_cpus_per_actor: float, num_gpus_per_actor: float,
                   amp: str | None, threads_per_actor: int | None,
                   shards_per_task: int = 0) -> tuple[Path, list[dict]]:
    """`extract`, also returning one record per shard processed (shard, rows, seconds, pid, ...)."""
    manifest = manifest_path_of(manifest_path)
    if amp not in AMP_DTYPES:
        raise ValueError(f"extract: amp must be one of {list(AMP_DTYPES)}, got {amp!r}")
    if batch_size <= 0:
        raise ValueError(f"extract: batch_size must be > 0, got {batch_size}")
    depth = int(read_export_header(export_dir)["model_config"].get("depth", 0)) or None
    layers = sorted({(int(i) % depth) if depth else int(i) for i in layers})
    store = prepare_store(export_dir, manifest, store_dir, features=features, layers=layers, dtype=dtype,
                          shard_rows=shard_rows, chunk_rows=chunk_rows, split=split)
    todo = store.missing()
    if not todo:
        return store.root, []
    kwargs = dict(export_dir=str(export_dir), manifest_path=str(manifest), store_dir=str(store.root),
                  features=list(features), layers=layers, split=split, batch_size=batch_size,
                  image_size=image_size, loader_kind=loader_kind, amp=amp, threads=threads_per_actor)
    groups = group_shards(todo, actors, shards_per_task)
    if actors <= 0:
        worker = ShardWorker(**kwargs)
        records = [r for g in groups for r in worker.run_shards(g)]
    else:
        records = _run_ray(groups, kwargs, actors, ray_address, num_cpus_per_actor, num_gpus_per_actor)
    missing = store.missing()
    if missing:
        raise ExtractionError(f"extract: {len(missing)} shards of {store.root} are still missing: {missing[:10]}")
    return store.root, records


def _run_ray(groups: list[list[int]], kwargs: dict, actors: int, address: str | None, num_cpus: float,
             num_gpus: float) -> list[dict]:
    import ray

    from data_pipeline.local_ray import start_or_join_ray

    start_or_join_ray(address, log_to_driver=True)
    # One block per task, so the pool hands tasks to actors one at a time (dynamic load balance).
    items = [{"shards": ",".join(map(str, g))} for g in groups]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        ShardWorker, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(actors, len(groups)), max_tasks_in_flight_per_actor=1),
        num_cpus=num_cpus, num_gpus=num_gpus or None, scheduling_strategy="SPREAD")  # actors on every node
    return ds.take_all()


def read_export_header(export_dir: Path | str) -> dict:
    """export.json (model config + provenance) without loading any weights."""
    path = Path(export_dir) / "export.json"
    if not path.is_file():
        raise FileNotFoundError(f"extract: {path} not found (not an export dir?)")
    return json.loads(path.read_text())
