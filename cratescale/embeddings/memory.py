"""Extraction memory, predicted before it is spent (issue 14.3), and the plan that follows from it.

Peak host memory of one extraction actor = a fixed process base (Python, torch, DALI, the Ray worker) + the
fp32 weights + the loader's batches in flight + the encoder's forward + its loader's feed worker processes (DALI's
parallel external source: outside the actor's RSS, inside what the node spends on it) + what grows with the manifest
(the key column of one Parquet row group, manifest_rows.py; the rest of the manifest is read from the node's shared
index and stays in the page cache). On the CPU the forward
materializes every block's attention scores and their softmax, 2 x heads x N x N floats per image (crate_mae_debug
at 224 px, patch 8: 785 tokens, 4 heads, 18.8 MiB an image), so the encoder runs the batch in chunks whose
scores stay under FORWARD_BUDGET: memory no longer grows with extract.batch_size beyond the loader's share.
On a GPU the scores live in the kernel (SDPA) and in device memory; host RSS is base + weights + batches.
Measured against predicted: BENCHMARKS.md "Extraction memory per actor".
"""
from __future__ import annotations

import itertools
import math
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

GiB = 2**30
MiB = 2**20
# Python + torch + DALI + pyarrow + Ray worker. Measured (BENCHMARKS.md "Extraction of the pretraining set"):
# 555 MB in a plain process, 580-630 MB in a Ray actor, with crate_mae_debug and DALI's CPU pipeline built.
# (900 MiB before issue 31: an upper bound that also covered a pandas copy of the manifest.)
PROCESS_BASE = 600 * MiB
# Private pages of one DALI feed worker: forked from the actor (the CPU pipeline) it shares the actor's pages and
# holds 97 MB of its own; started by spawn (where the actor holds CUDA) it is a whole interpreter, 222 MB with
# its helper process (both measured with 10^6 manifest rows).
FEED_WORKER = {"fork": 100 * MiB, "spawn": 230 * MiB}
# Copies of the largest row group's key column alive while a shard's keys are read (the decoded pages and the
# arrow array): +33 MB measured for a 16 MB column.
KEY_GROUP_COPIES = 2
# Forward activations of a chunk on the CPU: at most 0.25 GiB (12 images of crate_mae_debug at 224 px) bounds the
# peak; measured under load it encodes at 0.58-0.89 of the whole-batch speed (BENCHMARKS.md, a missed target):
# a larger budget may buy the speed back where the node's memory allows.
FORWARD_BUDGET = 256 * MiB
# Float images of one batch held at once: DALI's output buffers (prefetch depth 2), the torch copy, the
# re-cut concatenation of _shard_batches and its slice.
BATCH_COPIES = 5
# Per-token activations alive in a block besides the scores (x, U x, its head-major copy, attn @ w, the
# projections, ISTA's two products, the norms), in units of embed_dim floats.
TOKEN_WIDTHS = 12
# Of a node's memory, the share actors may plan for (the rest: the object store, the driver, the OS, other users).
NODE_SHARE = 0.7
AUTO_BATCHES = (256, 128, 64, 32, 16, 8)


@dataclass(frozen=True)
class MemoryPlan:
    batch_size: int
    actors: int
    chunk: int               # images per encoder forward
    per_actor: int           # predicted peak RSS of one actor, bytes

    def describe(self) -> str:
        return (f"{self.actors} actors x batch {self.batch_size} (encoder chunks of {self.chunk}), "
                f"{self.per_actor / GiB:.2f} GiB predicted per actor")


def tokens_of(config: dict[str, Any], image_size: int | None = None) -> int:
    side = int(image_size or config["img_size"]) // int(config["patch_size"])
    return side * side + 1  # + the cls token


def forward_bytes_per_image(config: dict[str, Any], image_size: int | None, device: str) -> int:
    """Encoder forward under no_grad, one image: scores + softmax on the CPU, per-token activations always."""
    n, d, heads = tokens_of(config, image_size), int(config["embed_dim"]), int(config["num_heads"])
    if device == "cpu":
        return 4 * (2 * heads * n * n + TOKEN_WIDTHS * n * d)
    return 0  # on a GPU the forward lives in device memory, not in the actor's RSS


def encode_chunk(config: dict[str, Any], image_size: int | None, device: str, batch_size: int) -> int:
    per_image = forward_bytes_per_image(config, image_size, device)
    return batch_size if per_image == 0 else max(1, min(batch_size, FORWARD_BUDGET // per_image))


def weight_bytes(config: dict[str, Any]) -> int:
    """fp32 encoder + decoder weights, from the widths (an export holds both)."""
    d, depth = int(config["embed_dim"]), int(config["depth"])
    dd, ddepth = int(config.get("decoder_embed_dim", d)), int(config.get("decoder_depth", 0))
    # A CRATE block is about 3 d^2 (U, proj, ISTA's D); a ViT block 12 d^2: take the larger, an upper bound.
    per_block = 12 if str(config.get("arch", "")).startswith("vit") else 3
    return 4 * (per_block * (d * d * depth + dd * dd * ddepth) + tokens_of(config) * (d + dd))


@dataclass(frozen=True)
class DataCost:
    """What an actor spends besides the model and its batches: its loader's feed worker processes and the bytes
    of the manifest it holds at once (`manifest_rows.key_group_bytes`)."""
    feed_workers: int = 0
    manifest_bytes: int = 0

    def bytes(self, device: str) -> int:
        start = "spawn" if device == "cuda" else "fork"   # dali_loader.worker_start_method
        return self.feed_workers * FEED_WORKER[start] + KEY_GROUP_COPIES * self.manifest_bytes


def predict_actor_bytes(config: dict[str, Any], image_size: int | None, batch_size: int, device: str = "cpu",
                        chunk: int | None = None, data: DataCost = DataCost()) -> int:
    """Peak memory of one actor (RSS + its feed workers' private pages) encoding `batch_size` images per batch,
    the forward in chunks of `chunk`."""
    side = int(image_size or config["img_size"])
    chunk = encode_chunk(config, image_size, device, batch_size) if chunk is None else min(chunk, batch_size)
    batches = BATCH_COPIES * batch_size * 3 * side * side * 4
    return (PROCESS_BASE + weight_bytes(config) + batches + chunk * forward_bytes_per_image(config, image_size, device)
            + data.bytes(device))


def plan_extraction(config: dict[str, Any], image_size: int | None, batch_size: int | str, actors: int | str, *,
                    node_memory: list[float], node_slots: list[int], device: str = "cpu",
                    data: DataCost = DataCost()) -> MemoryPlan:
    """Batch size and actor count that fit the nodes. node_memory: bytes per node; node_slots: actors each
    node's CPUs (or GPUs) can hold. "auto" picks the largest batch and count that fit; a number is kept when
    it fits and otherwise refused (batch) or lowered (actors, the caller says so)."""
    budget = [m * NODE_SHARE for m in node_memory]
    biggest = max(budget, default=0.0)
    batches = AUTO_BATCHES if batch_size == "auto" else (int(batch_size),)
    fitting = [b for b in batches if predict_actor_bytes(config, image_size, b, device, data=data) <= biggest]
    if not fitting:
        need = predict_actor_bytes(config, image_size, batches[-1], device, data=data)
        raise ValueError(f"one actor needs {need / GiB:.1f} GiB at batch {batches[-1]}, the largest node offers "
                          f"{biggest / GiB:.1f} GiB ({NODE_SHARE:.0%} of its memory): lower extract.batch_size")
    want = sum(node_slots) if actors == "auto" else int(actors)
    for batch in fitting:  # largest batch first; for auto, the largest that still gives every slot an actor
        per_actor = predict_actor_bytes(config, image_size, batch, device, data=data)
        fit = sum(min(slots, int(mem // per_actor)) for mem, slots in zip(budget, node_slots))
        if fit == 0 and batch == fitting[-1]:
            raise ValueError(f"no node has room for one actor (actors per node by CPUs or GPUs: {node_slots}, by "
                             f"memory: {per_actor / GiB:.1f} GiB each): check extract.gpus_per_actor")
        if fit >= want or batch_size != "auto" or batch == fitting[-1]:
            return MemoryPlan(batch, max(1, min(want, fit)), encode_chunk(config, image_size, device, batch),
                              per_actor)
    raise AssertionError("unreachable")


def cluster_nodes(cpus_per_actor: float, gpus_per_actor: float) -> tuple[list[float], list[int]]:
    """(memory bytes, actor slots) of every alive Ray node: slots from GPUs when actors take GPUs, else CPUs."""
    import ray

    memory, slots = [], []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        memory.append(float(res.get("memory", 0.0)))
        per = (res.get("GPU", 0.0) / gpus_per_actor) if gpus_per_actor else res.get("CPU", 0.0) / max(cpus_per_actor,
                                                                                                     1e-9)
        slots.append(int(math.floor(per + 1e-9)))
    return memory, slots


def available_memory() -> float:
    """MemAvailable of this machine in bytes (the in-process extraction's budget)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# An actor whose RSS passes this multiple of its prediction kills itself (SIGKILL, as the OOM killer would): Ray
# reserved the prediction for it, and an actor far over it would push the node into the memory monitor, which
# kills whatever runs newest (other actors, other users' work).
RSS_LIMIT_FACTOR = 2.0


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _private_bytes(pid: int) -> int:
    """Pages only this process holds (Private_Clean + Private_Dirty of smaps_rollup): what a forked child adds to
    its parent's RSS (the pages it still shares are the parent's, counted there); 0 once it has exited."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (DALI's feed workers, their helpers), from /proc/*/stat."""
    parent_of = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    parent_of[int(entry.name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for child, parent in parent_of.items() if parent in frontier]
        found += frontier
    return found


def high_water_bytes() -> int:
    """This process's peak RSS so far (VmHWM)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssGuard:
    """A daemon thread that follows this process's footprint on the node (its RSS + its children's private pages:
    the loader's feed workers sit outside what Ray reserved for the actor otherwise) and SIGKILLs the process once
    it exceeds `limit` bytes (0: follow only). `peak()`: the process's own high-water mark (exact, from the kernel:
    a forward's attention scores live for milliseconds, between two samples) plus the most its children held in any
    sample; at least the footprint's true peak."""

    def __init__(self, limit: int, interval_s: float = 0.2, rescan_every: int = 10) -> None:
        self.limit, self.interval_s, self.rescan_every, self.thread = int(limit), interval_s, rescan_every, None
        self.children_peak = 0
        self._stop = threading.Event()

    def start(self) -> None:
        if self.thread is None:
            self._stop.clear()
            self.thread = threading.Thread(target=self._watch, name="rss-guard", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        """Ends the thread (it reads every child's smaps_rollup each tick: a guard left running in a long-lived
        process, e.g. a driver or a test runner whose children are Ray and the ranks, burns a core in the kernel);
        `peak()` keeps what it saw."""
        if self.thread is not None:
            self._stop.set()
            self.thread.join()
            self.thread = None

    def _watch(self) -> None:
        children: list[int] = []
        for tick in itertools.count():
            if tick % self.rescan_every == 0:   # a /proc scan: not every tick
                children = descendants(os.getpid())
            children_bytes = sum(_private_bytes(pid) for pid in children)
            self.children_peak = max(self.children_peak, children_bytes)
            used = rss_bytes() + children_bytes
            if self.limit and used > self.limit:
                print(f"extract: actor pid {os.getpid()} uses {used / GiB:.2f} GiB (RSS and its loader workers), "
                      f"over its limit {self.limit / GiB:.2f} GiB: killed for memory", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            if self._stop.wait(self.interval_s):
                return

    def peak(self) -> int:
        return high_water_bytes() + self.children_peak
