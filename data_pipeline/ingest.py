"""Ingest a source into OUT/manifest.parquet (+ OUT/rejected.parquet, + OUT/shards/ when re-packed).

    python -m data_pipeline.ingest SOURCE OUT [--reshard SHORT_SIDE] [--shard-size N]
        [--val-per-class K] [--ray-address A] [--workers N] [--max-pixels P] [--no-progress]

SOURCE: an ImageFolder directory, a tar (.tar/.tar.gz/.tgz) of one, an ImageNet-21k tar-of-tars,
a directory of per-class tars, webdataset shards (a directory or glob of .tar), or
synthetic://shapes?n=..&classes=..&size=..&seed=... Work fans out over Ray tasks (a local Ray with
256 MB of object store unless --ray-address names a cluster, or one already runs in this process),
as many in flight as the Ray cluster has CPUs (--workers auto, the default) or --workers N;
--workers 0 runs the same task code inline without Ray.
The manifest records the source, its directory and a content fingerprint (see manifest.py).
A rerun into the same OUT writes identical bytes (sorted rows, stable shard names, atomic renames).
Finished work units are committed to OUT/.ingest/ as they arrive: a killed ingest, run again with the same
settings, runs only the units that were not committed and writes the same bytes (see ingest_units.py). A
folder's class directories are listed by Ray tasks, one per directory (listing.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import pyarrow.compute as pc

from .ingest_units import Journal
from .listing import ray_map
from .manifest import build_table, source_id, write_manifest, write_rejected
from .sources import LISTING_CHUNK, Plan, SourceError, Unit, plan_source
from .validate import DEFAULT_MAX_PIXELS
from .work import SHARD_DIR, SHARD_SIZE, IngestOptions, process_unit


class IngestError(RuntimeError):
    """Ingest produced no usable samples."""


@dataclass
class IngestResult:
    manifest: Path
    rejected: Path
    source_kind: str
    samples: int
    classes: int
    rejected_count: int
    reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    startup_seconds: float = 0.0  # starting Ray (0 when inline or Ray was already running)
    workers: int = 0  # tasks in flight (0: inline)
    hosts: Counter = field(default_factory=Counter)  # units processed per host ("resumed": from the journal)
    units: int = 0    # work units of the plan
    resumed: int = 0  # of them, committed by an earlier (killed) run and not run again

    def summary(self) -> str:
        rate = (self.samples + self.rejected_count) / max(self.seconds - self.startup_seconds, 1e-9)
        lines = [f"ingested {self.samples} samples in {self.classes} classes from a {self.source_kind} source "
                 f"in {self.seconds:.1f} s ({self.startup_seconds:.1f} s starting Ray, then {rate:.0f} files/s, "
                 f"{self.workers or 'no'} Ray tasks in flight)",
                 f"manifest: {self.manifest}", f"rejected: {self.rejected_count} -> {self.rejected}",
                 "units per host: " + ", ".join(f"{h} {n}" for h, n in sorted(self.hosts.items())),
                 f"resumed: {self.resumed} of {self.units} units already done"]
        lines += [f"  {n:6d}  {reason}" for reason, n in self.reasons.most_common(10)]
        return "\n".join(lines)


Workers = int | Literal["auto"]


def _start_ray(ray_address: str | None, workers: Workers):
    import ray

    from data_pipeline.local_ray import start_or_join_ray

    # None: this machine's cores (a cluster that is joined has its own)
    return ray, start_or_join_ray(ray_address, num_cpus=None if workers == "auto" else max(2, workers))


def cluster_cpus(ray) -> int:
    """The CPUs of the Ray cluster this process is connected to (all nodes of an allocation)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


@contextmanager
def _ray_or_inline(ray_address: str | None, workers: Workers) -> Iterator[tuple[object | None, int]]:
    """(ray, tasks in flight) for the ingest: Ray started or joined, one task per CPU of its cluster when
    "auto"; (None, 0) when workers == 0 (everything inline). A Ray started here is shut down after."""
    if workers != "auto" and workers <= 0:
        yield None, 0
        return
    ray, started = _start_ray(ray_address, workers)
    try:
        yield ray, cluster_cpus(ray) if workers == "auto" else workers
    finally:
        if started:
            ray.shutdown()


def _run_units(units: Iterable[Unit], opts: IngestOptions, ray, workers: int,
               on_result: Callable[[Unit, dict], None]) -> None:
    """Run process_unit over `units`, at most `workers` in flight as Ray tasks (inline when ray is None)."""
    if ray is None:
        for u in units:
            on_result(u, process_unit(u, opts))
        return
    # SPREAD: units go round the cluster's nodes instead of filling the driver's node first
    task = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(process_unit)
    inflight: dict = {}

    def drain(limit: int) -> None:
        while len(inflight) > limit:
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                on_result(inflight.pop(ref), ray.get(ref))

    for u in units:
        drain(workers - 1)
        inflight[task.remote(u, opts)] = u
    drain(0)


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]:>7.0f} files/s"), TextColumn("{task.fields[bad]} rejected"),
                    TimeElapsedColumn(), console=Console(stderr=True), disable=not enabled)


def _remove_stale_shards(out: Path, keep: set[str]) -> None:
    """Shards of an earlier run with other options would otherwise linger unreferenced."""
    shard_dir = out / SHARD_DIR
    if not shard_dir.is_dir():
        return
    for p in shard_dir.iterdir():
        if (p.suffix == ".tar" and str(p) not in keep) or ".tmp-" in p.name:
            p.unlink()


def run_ingest(source: str, out: str | Path, *, reshard: int | None = None, shard_size: int = SHARD_SIZE,
               val_per_class: int = 0, ray_address: str | None = None, workers: Workers = "auto",
               max_pixels: int = DEFAULT_MAX_PIXELS, quality: int = 90, progress: bool = True) -> IngestResult:
    """Ingest `source` into `out`; see the module docstring."""
    t0 = time.perf_counter()
    if shard_size <= 0 or val_per_class < 0 or (reshard is not None and reshard < 8) or \
            (workers != "auto" and (not isinstance(workers, int) or workers < 0)):
        raise ValueError(f"ingest: bad options shard_size={shard_size} val_per_class={val_per_class} "
                         f"reshard={reshard} workers={workers!r}")
    out = Path(os.path.abspath(out))
    out.mkdir(parents=True, exist_ok=True)
    opts = IngestOptions(str(out), reshard, shard_size, max_pixels, quality)
    parts: list = []  # one pa.Table of rows per finished unit
    rejects: list[dict] = []  # from tasks; plan.rejects (driver-side) may grow while streaming
    hosts: Counter = Counter()
    with _ray_or_inline(ray_address, workers) as (ray, workers):
        ready = time.perf_counter()
        plan: Plan = plan_source(source, shard_size if reshard else LISTING_CHUNK, shard_size,
                                 ray_map(ray) if ray is not None else None)
        journal = Journal(source_id(source), opts)
        known = None if plan.stream is not None or any(u.count is None for u in plan.units) \
            else sum(u.count for u in plan.units) + len(plan.rejects)
        with _progress(progress) as bar:
            tid = bar.add_task(f"ingest {plan.kind}", total=known, rate=0.0, bad=len(plan.rejects),
                               completed=len(plan.rejects))

            def on_result(unit: Unit, res: dict) -> None:
                parts.append(res["rows"])
                hosts[res["host"]] += 1
                rejects.extend(res["rejects"])
                done = bar.tasks[0].completed + res["seen"]
                bar.update(tid, completed=done, rate=done / max(time.perf_counter() - ready, 1e-9),
                           bad=len(plan.rejects) + len(rejects))

            def on_finished(unit: Unit, res: dict) -> None:
                journal.commit(unit, res)  # a kill loses only the units in flight (and commits being written)
                on_result(unit, res)

            units = journal.pending(plan.stream if plan.stream is not None else plan.units, on_result)
            _run_units(units, opts, ray, workers, on_finished)
            journal.flush()
    rejects = plan.rejects + rejects
    rejected_path = write_rejected(rejects, out)
    table = build_table(parts, val_per_class)
    if table.num_rows == 0:
        raise IngestError(f"ingest {source}: no decodable images ({len(rejects)} rejected, see {rejected_path})")
    repacked = pc.any(pc.starts_with(table["path"], str(out / SHARD_DIR) + "/")).as_py()
    manifest = write_manifest(table, out, source, ingest_settings(reshard=reshard, shard_size=shard_size,
                                                                  val_per_class=val_per_class, max_pixels=max_pixels,
                                                                  quality=quality, repacked=bool(repacked)))
    if not str(Path(source).absolute()).startswith(str(out / SHARD_DIR)):
        _remove_stale_shards(out, set(table["path"].unique().to_pylist()))
    journal.remove()
    return IngestResult(manifest, rejected_path, plan.kind, table.num_rows, len(table["class_name"].unique()),
                        len(rejects), Counter(_reason_kind(r["reason"]) for r in rejects), time.perf_counter() - t0,
                        ready - t0, workers, hosts, journal.units, journal.resumed)


def ingest_settings(*, reshard: int | None, shard_size: int, val_per_class: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                    quality: int = 90, repacked: bool = True) -> dict[str, int | None]:
    """The settings that shape a manifest, as it records them and a job compares them (manifest_action). The
    shard size shapes only samples re-packed into shards, the JPEG quality only re-encoded (resharded) ones."""
    settings: dict[str, int | None] = {"val_per_class": val_per_class, "reshard": reshard, "max_pixels": max_pixels}
    if repacked:
        settings["shard_size"] = shard_size
    if reshard is not None:
        settings["quality"] = quality
    return settings


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0]


def ingest(source: str, out: str | Path, **kwargs) -> Path:
    """Ingest `source` into `out` and return the manifest path (kwargs as in run_ingest)."""
    return run_ingest(source, out, **kwargs).manifest


def _workers_arg(text: str) -> Workers:
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give auto or a number") from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"cratescale {version('cratescale')}"
    except PackageNotFoundError:
        return "cratescale (not installed: run from a checkout)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.ingest", description=__doc__.split("\n")[0])
    ap.add_argument("source")
    ap.add_argument("out")
    ap.add_argument("--reshard", type=int, default=None, metavar="SHORT_SIDE",
                    help="re-encode good images to RGB JPEG with this short side, into tar shards")
    ap.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="samples per written tar shard")
    ap.add_argument("--val-per-class", type=int, default=0, help="mark K samples per class as split 'val'")
    ap.add_argument("--ray-address", default=None, help="join this Ray cluster instead of a local one")
    ap.add_argument("--workers", type=_workers_arg, default="auto",
                    help="tasks in flight: auto (one per CPU of the Ray cluster), N, or 0 (inline, no Ray)")
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb limit")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality for --reshard")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--version", action="version", version=_version())
    a = ap.parse_args(argv)
    try:
        res = run_ingest(a.source, a.out, reshard=a.reshard, shard_size=a.shard_size, val_per_class=a.val_per_class,
                         ray_address=a.ray_address, workers=a.workers, max_pixels=a.max_pixels, quality=a.quality,
                         progress=not a.no_progress)
    except (SourceError, IngestError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(res.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
