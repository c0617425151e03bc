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
manifest order. A row whose image could not be read or decoded keeps its place with `valid` False in the
metadata and NaN features (never the features of a stand-in image); evaluation leaves it out.
"""
from __future__ import annotations

import hashlib
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from cratescale.checkpoint.export import export_fingerprint, load_model, read_export_header
from cratescale.embeddings.memory import RSS_LIMIT_FACTOR, DataCost, RssGuard, encode_chunk
from cratescale.embeddings.pool import init_ray  # noqa: F401 - callers start Ray through extract
from cratescale.embeddings.manifest_rows import ManifestRows, count_store_rows, key_group_bytes
from cratescale.embeddings.store import EmbeddingStore, StoreError, StoreInfo

BASE_FEATURES = ("cls", "mean")
AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}  # and "auto": bf16 on GPUs


class ExtractionError(RuntimeError):
    """The extraction ended with shards still uncommitted."""


def manifest_path_of(path: Path | str) -> Path:
    p = Path(path)
    p = p / "manifest.parquet" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"extract: manifest not found: {p}")
    return p


def feature_names(features: Sequence[str], layers: Sequence[int]) -> list[str]:
    bad = [f for f in features if f not in BASE_FEATURES]
    if bad or not features:
        raise ValueError(f"extract: features must be a non-empty subset of {BASE_FEATURES}, got {list(features)}")
    return [*features, *(f"layer_{i}_{f}" for i in layers for f in features)]


def actor_device(device: str, gpus: float) -> str:
    """"auto": the GPU Ray gave this actor (Ray sets CUDA_VISIBLE_DEVICES, so it is cuda:0 here), else the CPU.
    An actor that asked for no GPU never takes one (before, every actor of a node took cuda:0); one that asked
    for a GPU and has no CUDA stops with one line instead of running on the CPU."""
    if device != "auto":
        return device
    if not gpus:
        return "cpu"
    if not torch.cuda.is_available():
        raise ExtractionError(f"extract: extract.gpus_per_actor is {gpus} but torch {torch.__version__} sees no CUDA "
                              f"device (CUDA build {torch.version.cuda}, CUDA_VISIBLE_DEVICES="
                              f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return "cuda"


def _ray_assignment() -> tuple[int, int]:
    """(first GPU id, memory bytes) Ray assigned to this worker; (-1, 0) outside Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return -1, 0
        ids, held = ray.get_gpu_ids(), ray.get_runtime_context().get_assigned_resources()
    except Exception:  # noqa: BLE001 - not in a Ray worker
        return -1, 0
    return (int(ids[0]) if ids else -1), int(held.get("memory", 0))


def pooled_features(out: dict[str, Any], features: Sequence[str], layers: Sequence[int]) -> dict[str, torch.Tensor]:
    """`model.encode`'s output -> the stored features by name ("cls", "mean", "layer_<i>_<cls|mean>"), float32 CPU."""
    feats = {f: out[f] for f in features}
    for i, tokens in zip(layers, out.get("layers", [])):
        pooled = {"cls": tokens[:, 0], "mean": tokens[:, 1:].mean(dim=1)}
        feats.update({f"layer_{i}_{f}": pooled[f] for f in features})
    return {k: v.float().cpu() for k, v in feats.items()}


class ShardWorker:
    """Loads the model once; `run_shards(ks)` fills shards ks of the store. Also the Ray Data UDF."""

    def __init__(self, export_dir: str, manifest_path: str, store_dir: str, *, features: Sequence[str],
                 layers: Sequence[int], split: str | None, batch_size: int, image_size: int | None,
                 loader_kind: str, device: str = "auto", amp: str | None = "auto", threads: int | None = None,
                 gpus: float = 0.0, chunk: int | None = None, loader_options: dict | None = None,
                 rss_limit: int = 0):
        self.guard = RssGuard(rss_limit)  # runs while a task runs: loading the model is not the risk
        if threads:
            torch.set_num_threads(threads)
        self.gpu, self.memory_held = _ray_assignment()
        self.device = torch.device(actor_device(device, gpus))
        self.model, _ = load_model(export_dir, self.device)
        self.store = EmbeddingStore(store_dir)
        self.manifest_path = manifest_path
        self.manifest_rows = ManifestRows(manifest_path, split)  # the shared index: nothing per actor grows with it
        self.features, self.layers = list(features), [int(i) for i in layers]
        self.batch_size, self.loader_kind = batch_size, loader_kind
        self.loader_options = dict(loader_options or {})
        self.image_size = int(image_size or self.model.img_size)
        # bf16 autocast on GPUs, fp32 on the CPU (where bf16 matmuls are slower than fp32 ones)
        self.amp = AMP_DTYPES[("bf16" if self.device.type == "cuda" else None) if amp == "auto" else amp]
        # On the CPU the attention scores are materialized: the forward runs in chunks (memory.py)
        self.chunk = chunk or encode_chunk(self.model.config, self.image_size, self.device.type, batch_size)

    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feature name -> (B, d) float32 on the CPU; the forward in chunks of `self.chunk` images."""
        parts = [self._encode(chunk) for chunk in images.split(self.chunk)]
        return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}

    def _encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                                             enabled=self.amp is not None):
            out = self.model.encode(images.to(self.device, non_blocking=True),
                                    layers=self.layers if self.layers else None)
        return pooled_features(out, self.features, self.layers)

    def run_shards(self, ks: Sequence[int]) -> list[dict[str, Any]]:
        """Fill shards `ks` (skipping committed ones) from ONE loader over their rows: the loader's start-up
        (DALI spawns its feed workers) is paid once per task, not once per shard. Batches are re-cut at
        shard starts so every shard sees exactly the batches a lone run of it would: features do not
        depend on how shards were grouped, and a resumed store stays byte-identical."""
        done = self.store.committed()
        ks = [int(k) for k in ks if int(k) not in done]   # done by an earlier attempt of this task
        if not ks:
            return []
        self.guard.start()
        try:
            return self._fill(ks)
        finally:
            self.guard.stop()

    def _fill(self, ks: list[int]) -> list[dict[str, Any]]:
        from data_pipeline.loader import make_eval_loader

        spans = [self.store.info.shard_range(k) for k in ks]
        rows = np.concatenate([self.manifest_rows.rows(a, b) for a, b in spans])
        loader = make_eval_loader(self.manifest_path, rows, self.batch_size, self.image_size,
                                  kind=self.loader_kind, **self.loader_options)
        records, parts, valid, t0, t_enc = [], {}, [], time.perf_counter(), 0.0
        try:
            for i, images, ok, last in _shard_batches(loader, [b - a for a, b in spans], self.batch_size):
                t = time.perf_counter()
                for name, v in self.encode(images).items():
                    parts.setdefault(name, []).append(v)
                t_enc += time.perf_counter() - t
                valid.append(ok.cpu().numpy())
                if last:
                    records.append(self._commit(ks[i], spans[i], parts, np.concatenate(valid), t0, t_enc))
                    parts, valid, t0, t_enc = {}, [], time.perf_counter(), 0.0
        finally:
            loader.close()  # we stop at the last row, before the loader's own end-of-data close
        return records

    def run_shard(self, k: int) -> dict[str, Any] | None:
        records = self.run_shards([k])
        return records[0] if records else None

    def _commit(self, k: int, span: tuple[int, int], parts: dict, valid: np.ndarray, t0: float,
                t_enc: float) -> dict:
        rows = self.manifest_rows.rows(*span)
        feats = {name: torch.cat(v).numpy() for name, v in parts.items()}
        for f in feats.values():
            f[~valid] = np.nan  # the encoder saw filler bytes there, not the sample
        self.store.write_shard(k, feats, self.manifest_rows.metadata(rows).assign(valid=valid))
        return {"shard": k, "rows": len(rows), "seconds": time.perf_counter() - t0, "encode_seconds": t_enc,
                "invalid": int((~valid).sum()), "pid": os.getpid(), "gpu": self.gpu, "memory_held": self.memory_held,
                "peak_memory": self.guard.peak(), "host": socket.gethostname()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data UDF: each input row is a task, "shards" = comma-separated shard indices."""
        records = [r for group in batch["shards"] for r in self.run_shards(_parse_group(group))]
        return {key: np.array([r[key] for r in records], dtype=_RECORD_DTYPES.get(key, np.int64))
                for key in RECORD_KEYS}


RECORD_KEYS = ("shard", "rows", "seconds", "encode_seconds", "invalid", "pid", "gpu", "memory_held", "peak_memory",
               "host")
_RECORD_DTYPES = {"seconds": np.float64, "encode_seconds": np.float64, "host": np.str_}


def _parse_group(group: Any) -> list[int]:
    return [int(k) for k in str(group).split(",") if k]


def _shard_batches(loader: Iterable[dict], lengths: Sequence[int], size: int):
    """Re-cut loader batches into batches of <= `size` that restart at every shard start and never cross a
    shard end. Yields (shard position, images, valid, is_last_batch_of_shard)."""
    it = iter(loader)
    xs: list[torch.Tensor] = []
    oks: list[torch.Tensor] = []  # each row's `valid` flag
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
                oks.append(b["valid"])
                have += len(b["images"])
            x, ok = torch.cat(xs), torch.cat(oks)
            left -= want
            yield i, x[:want], ok[:want], left == 0
            xs, oks, have = [x[want:]], [ok[want:]], have - want


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
    return EmbeddingStore.create(store_dir, store_info(export_dir, manifest_path, features=features, layers=layers,
                                                       dtype=dtype, shard_rows=shard_rows, chunk_rows=chunk_rows,
                                                       split=split))


def stale_reason(store_dir: Path | str, export_dir: Path | str, manifest_path: Path | str, *,
                 features: Sequence[str], layers: Sequence[int], dtype: str, shard_rows: int, chunk_rows: int,
                 split: str | None) -> str | None:
    """Why the store at `store_dir` is not what this extraction would make (another export, manifest or
    layout), or None: it is, or there is no store yet (a rerun then resumes it)."""
    if not (Path(store_dir) / "store.json").is_file():
        return None
    have = EmbeddingStore(store_dir)
    layers = encoder_layers(read_export_header(export_dir), layers)
    want = store_info(export_dir, manifest_path, features=features, layers=layers, dtype=dtype,
                      shard_rows=shard_rows, chunk_rows=chunk_rows, split=split)
    old, new = have.info.provenance, want.provenance
    if old.get("fingerprint") != new["fingerprint"]:
        return f"made from the export of step {old.get('step')}, the export is now step {new.get('step')}"
    try:
        have._check_compatible(want)
    except StoreError as err:
        return str(err).split("; use a new store directory")[0]
    return None


def encoder_layers(header: dict[str, Any], layers: Iterable[int]) -> list[int]:
    """Layer indices as the store names them: negative ones counted from the export's depth, sorted, unique."""
    depth = int(header["model_config"].get("depth", 0)) or None
    return sorted({(int(i) % depth) if depth else int(i) for i in layers})


def store_info(export_dir: Path | str, manifest_path: Path | str, *, features: Sequence[str],
               layers: Sequence[int], dtype: str, shard_rows: int, chunk_rows: int, split: str | None) -> StoreInfo:
    """What store.json says of the store this export and manifest make."""
    manifest = manifest_path_of(manifest_path)
    header = read_export_header(export_dir)
    config, provenance = header["model_config"], header.get("provenance", {})
    n = count_store_rows(manifest, split)
    if n == 0:
        raise ValueError(f"extract: {manifest} has no rows of split {split!r}")
    d = int(config["embed_dim"])
    return StoreInfo(num_rows=n, dims={name: d for name in feature_names(features, layers)}, dtype=dtype,
                     shard_rows=shard_rows, chunk_rows=min(chunk_rows, shard_rows),
                     source={"manifest": str(manifest.resolve()), "fingerprint": _fingerprint(manifest),
                             "split": split, "rows": n},
                     provenance={"export": str(Path(export_dir).resolve()), **provenance, "model_config": config,
                                 "fingerprint": export_fingerprint(export_dir)})


def extract(export_dir: Path | str, manifest_path: Path | str, store_dir: Path | str, *,
            features: Sequence[str] = ("cls", "mean"), layers: Sequence[int] = (), dtype: str = "float16",
            batch_size: int | str = 64, actors: int | str = 2, image_size: int | None = None,
            loader_kind: str = "auto", ray_address: str | None = None, shard_rows: int = 4096,
            chunk_rows: int = 1024, split: str | None = None, num_cpus_per_actor: float = 0.5,
            num_gpus_per_actor: float = 0.0, amp: str | None = "auto", threads_per_actor: int | None = None,
            shards_per_task: int = 0, loader_options: dict | None = None, max_restarts: int = 3,
            device: str = "auto", rss_limit: int | None = None) -> Path:
    """Fill `store_dir` with the export's encoder features for every selected manifest row; returns the
    store path. Reruns skip committed shards. batch_size / actors: a number or "auto" (from the nodes' memory
    and CPUs or GPUs, memory.py). On a GPU cluster: num_gpus_per_actor=1 (bf16 autocast follows)."""
    return run_extraction(**locals())[0]  # locals() here is exactly the argument dict


def data_cost(manifest: Path, loader_kind: str, loader_options: dict | None) -> DataCost:
    """What an actor spends on its loader's feed workers (DALI's; PIL decodes in threads) and on the manifest."""
    workers = 0 if loader_kind == "pil" else max(1, int((loader_options or {}).get("py_workers", 1)))
    return DataCost(feed_workers=workers, manifest_bytes=key_group_bytes(manifest))


def run_extraction(export_dir: Path | str, manifest_path: Path | str, store_dir: Path | str, *,
                   features: Sequence[str], layers: Sequence[int], dtype: str, batch_size: int | str,
                   actors: int | str, image_size: int | None, loader_kind: str, ray_address: str | None,
                   shard_rows: int, chunk_rows: int, split: str | None, num_cpus_per_actor: float,
                   num_gpus_per_actor: float, amp: str | None, threads_per_actor: int | None,
                   shards_per_task: int = 0, loader_options: dict | None = None, max_restarts: int = 3,
                   device: str = "auto", rss_limit: int | None = None) -> tuple[Path, list[dict]]:
    """`extract`, also returning one record per shard processed (shard, rows, seconds, pid, gpu, ...)."""
    from cratescale.embeddings.pool import ActorsFailed, plan_for, run_pool

    manifest = manifest_path_of(manifest_path)
    if amp not in AMP_DTYPES and amp != "auto":
        raise ValueError(f"extract: amp must be one of {[*AMP_DTYPES, 'auto']}, got {amp!r}")
    if batch_size != "auto" and int(batch_size) <= 0:
        raise ValueError(f"extract: batch_size must be > 0 or 'auto', got {batch_size}")
    header = read_export_header(export_dir)
    layers = encoder_layers(header, layers)
    store = prepare_store(export_dir, manifest, store_dir, features=features, layers=layers, dtype=dtype,
                          shard_rows=shard_rows, chunk_rows=chunk_rows, split=split)
    todo = store.missing()
    if not todo:
        return store.root, []
    plan = plan_for(header["model_config"], image_size, batch_size, actors, ray_address, num_cpus_per_actor,
                    num_gpus_per_actor, data_cost(manifest, loader_kind, loader_options))
    kwargs = dict(export_dir=str(export_dir), manifest_path=str(manifest), store_dir=str(store.root),
                  features=list(features), layers=layers, split=split, batch_size=plan.batch_size,
                  image_size=image_size, loader_kind=loader_kind, amp=amp, threads=threads_per_actor,
                  gpus=num_gpus_per_actor, chunk=plan.chunk, loader_options=loader_options, device=device,
                  rss_limit=0 if actors == 0 else int(plan.per_actor * RSS_LIMIT_FACTOR if rss_limit is None
                                                      else rss_limit))
    groups = group_shards(todo, plan.actors, shards_per_task)
    if actors == 0:
        worker = ShardWorker(**kwargs)
        records = [r for g in groups for r in worker.run_shards(g)]
    else:
        try:
            records = run_pool(groups, kwargs, plan, num_cpus_per_actor, num_gpus_per_actor, max_restarts)
        except ActorsFailed as err:
            left = len(store.missing())
            raise ExtractionError(
                f"extract: stopped, {err} (each actor restarted at most {max_restarts} times); "
                f"{store.info.num_shards - left} of {store.info.num_shards} shards committed and kept in {store.root}; "
                f"rerun with a smaller extract.batch_size (now {plan.batch_size}) or extract.actors (now "
                f"{plan.actors}) to resume") from None
    missing = store.missing()
    if missing:
        raise ExtractionError(f"extract: {len(missing)} shards of {store.root} are still missing: {missing[:10]}")
    return store.root, records

