"""Extraction memory and restarts (issue 14.3-14.4) and its GPU settings (issues 15, 13.5): the memory plan,
chunked CPU attention, bounded restarts of actors killed for memory (real Ray, a real SIGKILL), the GPU
request through a Ray cluster with fake GPU resources, and the CPU twin of bf16 autocast."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cratescale.checkpoint.export import export_weights
from cratescale.embeddings.extract import ExtractionError, ShardWorker, actor_device, prepare_store
from cratescale.embeddings.memory import GiB, plan_extraction, predict_actor_bytes
from cratescale.embeddings.store import EmbeddingStore
from cratescale.models import create_model

REPO = Path(__file__).resolve().parents[2]
N = 40
DEBUG_224 = dict(create_model("crate_mae_debug", img_size=224).config)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from data_pipeline.ingest import ingest

    root = tmp_path_factory.mktemp("limits")
    manifest = ingest(f"synthetic://shapes?n={N}&classes=4&size=32&seed=0", root / "data", workers=0,
                      progress=False)
    torch.manual_seed(0)
    model = create_model("crate_mae_debug")
    export_weights(model.state_dict(), model.config, {"step": 3}, root / "export")
    return root, Path(manifest)


def worker(root: Path, manifest: Path, store: Path, **kw) -> ShardWorker:
    prepare_store(root / "export", manifest, store, features=["cls", "mean"], layers=[], dtype="float32",
                  shard_rows=8, chunk_rows=8, split=None)
    return ShardWorker(str(root / "export"), str(manifest), str(store), features=["cls", "mean"], layers=[],
                       split=None, batch_size=kw.pop("batch_size", 8), image_size=None, loader_kind="pil", **kw)


def test_plan_follows_the_nodes_memory_and_cpus():
    one = predict_actor_bytes(DEBUG_224, 224, 64)
    # the CPU forward is chunked: a batch of 512 costs its images, not 512 x 19 MiB of attention scores
    assert predict_actor_bytes(DEBUG_224, 224, 512) - one < 448 * 5 * 3 * 224 * 224 * 4 + 1
    assert predict_actor_bytes(DEBUG_224, 224, 512, chunk=512) > 9 * GiB   # what the issue measured (13 GiB)
    auto = plan_extraction(DEBUG_224, 224, "auto", "auto", node_memory=[24 * GiB], node_slots=[4])
    assert auto.actors == 4 and auto.batch_size == 256 and auto.per_actor * 4 <= 0.7 * 24 * GiB
    small = plan_extraction(DEBUG_224, 224, "auto", "auto", node_memory=[4 * GiB], node_slots=[4])
    assert small.batch_size < 256 and small.actors * small.per_actor <= 0.7 * 4 * GiB
    fixed = plan_extraction(DEBUG_224, 224, 512, 8, node_memory=[24 * GiB], node_slots=[16])
    assert fixed.batch_size == 512 and fixed.actors < 8 and fixed.actors * fixed.per_actor <= 0.7 * 24 * GiB
    with pytest.raises(ValueError, match="one actor needs .* GiB at batch 512, the largest node offers 1.4 GiB .*: "
                                         "lower extract.batch_size"):
        plan_extraction(DEBUG_224, 224, 512, 1, node_memory=[2 * GiB], node_slots=[1])
    with pytest.raises(ValueError, match=r"no node has room for one actor \(actors per node by CPUs or GPUs: \[0\]"):
        plan_extraction(DEBUG_224, 224, 64, 1, node_memory=[24 * GiB], node_slots=[0])   # gpus asked, none there


def test_chunked_cpu_encode_equals_one_forward(setup, tmp_path):
    root, manifest = setup
    images = torch.rand(10, 3, 32, 32)
    whole = worker(root, manifest, tmp_path / "a", chunk=10).encode(images)
    chunked = worker(root, manifest, tmp_path / "b", chunk=3).encode(images)
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-5, atol=1e-5)


def test_bf16_autocast_cpu_twin(setup, tmp_path):
    """What GPU actors run (bf16 autocast), here on the CPU: close to fp32, and really in bf16."""
    root, manifest = setup
    images = torch.rand(8, 3, 32, 32)
    fp32 = worker(root, manifest, tmp_path / "a")          # amp "auto" on the CPU: fp32
    bf16 = worker(root, manifest, tmp_path / "b", amp="bf16")
    assert fp32.amp is None and bf16.amp is torch.bfloat16
    a, b = fp32.encode(images), bf16.encode(images)
    for name in a:
        assert b[name].dtype == torch.float32 and not torch.equal(a[name], b[name])
        torch.testing.assert_close(b[name], a[name], rtol=0.05, atol=0.05)


def test_actor_device_never_takes_an_unasked_gpu(monkeypatch):
    assert actor_device("auto", 0) == "cpu"
    with pytest.raises(ExtractionError, match="gpus_per_actor is 1 but torch .* sees no CUDA device"):
        actor_device("auto", 1)            # no silent CPU for an actor that asked for a GPU
    # Mock (no GPU here): with CUDA visible, an actor that asked for no GPU still stays off cuda:0.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert actor_device("auto", 0) == "cpu" and actor_device("auto", 1) == "cuda"


FAKE_GPUS = r"""
import sys, ray
from cratescale.embeddings.extract import run_extraction
ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
         runtime_env={"env_vars": {"PYTHONPATH": sys.argv[4]}})
# device="cpu": the mock for what cannot run here (a GPU); Ray's placement and CUDA_VISIBLE_DEVICES are real.
_, records = run_extraction(sys.argv[1], sys.argv[2], sys.argv[3], features=["cls"], layers=[], dtype="float32",
    batch_size=8, actors=2, image_size=None, loader_kind="pil", ray_address=None, shard_rows=8, chunk_rows=8,
    split=None, num_cpus_per_actor=0.5, num_gpus_per_actor=1, amp=None, threads_per_actor=1, shards_per_task=1,
    device="cpu")
print("GPUS", sorted({(int(r["pid"]), int(r["gpu"]), int(r["memory_held"])) for r in records}))
"""


def test_actors_ask_ray_for_one_gpu_each(setup, tmp_path):
    root, manifest = setup
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", FAKE_GPUS, str(root / "export"), str(manifest), str(tmp_path / "s"),
                          str(REPO)], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    held = eval(res.stdout.split("GPUS", 1)[1].strip())  # [(pid, gpu id, memory bytes Ray reserved)]
    # every actor that worked held its own GPU and its predicted memory (one actor may take all the tasks
    # while the other still starts)
    assert held and all(gpu in (0, 1) and memory > 2**29 for _, gpu, memory in held), held
    assert len({gpu for _, gpu, _ in held}) == len({pid for pid, _, _ in held}) == len(held), held


def test_the_memory_guard_runs_only_while_a_task_runs(setup, tmp_path):
    """The guard reads every child's smaps_rollup each 0.2 s. Left running after its task, in-process extraction
    (actors 0) leaked one such thread per call into the caller: 16 in the test runner, whose children are Ray
    and the ranks, kept a core busy in the kernel and made the suite about twice as slow."""
    root, manifest = setup
    guards = lambda: [t for t in threading.enumerate() if t.name == "rss-guard"]  # noqa: E731
    before = len(guards())
    shard_worker = worker(root, manifest, tmp_path / "store")
    record = shard_worker.run_shard(0)
    assert len(guards()) == before and shard_worker.guard.thread is None
    assert record["peak_memory"] >= shard_worker.guard.peak() - shard_worker.guard.children_peak > 0
    assert shard_worker.run_shard(1)["shard"] == 1 and len(guards()) == before  # and again for the next task


def test_actor_killed_for_memory_stops_bounded_and_keeps_commits(setup, tmp_path):
    """A real SIGKILL of every actor at its first task (an RSS limit of 1 MiB): the run stops after the bounded
    restarts with one line naming the cause and the knobs, exit 1; the shard committed before is kept and a
    rerun with a smaller batch resumes and completes."""
    root, manifest = setup
    store = tmp_path / "store"
    worker(root, manifest, store).run_shard(0)
    marker = sorted((store / "commits").iterdir())[0].read_bytes()
    cli = [sys.executable, "-m", "cratescale.embeddings", "extract", str(root / "export"), str(manifest), str(store),
           "--dtype", "float32", "--shard-rows", "8", "--chunk-rows", "8", "--loader", "pil", "--actors", "2"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    res = subprocess.run([*cli, "--batch-size", "8", "--max-restarts", "1", "--rss-limit-mb", "1"],
                         capture_output=True, text=True, timeout=400, env=env, cwd=REPO)
    elapsed = time.monotonic() - t0
    # the CLI's own error line (Ray's forwarded actor logs may arrive after it, in any order)
    last = next((line for line in reversed(res.stderr.splitlines()) if line.startswith("error: ")), "")
    assert res.returncode == 1, res.stderr[-3000:]
    assert last == (f"error: extract: stopped, actors were killed for memory (over their RSS limit, by Ray's memory "
                    f"monitor or by the OOM killer) (each actor restarted at most 1 times); 1 of 5 shards committed "
                    f"and kept in {store}; rerun with a smaller extract.batch_size (now 8) or extract.actors (now 2) "
                    f"to resume"), last
    assert elapsed < 240, elapsed   # Ray start + 2 actors x 2 lives on a loaded 2-core machine; was unbounded
    assert EmbeddingStore(store).missing() == [1, 2, 3, 4]
    res = subprocess.run([*cli, "--batch-size", "4", "--rss-limit-mb", "0"], capture_output=True, text=True,
                         timeout=400, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    done = EmbeddingStore(store)
    assert done.is_complete() and sorted((store / "commits").iterdir())[0].read_bytes() == marker
    assert np.isfinite(done.read("cls")).all()


def test_a_lost_nodes_actor_is_named_in_one_line():
    """What tests/slurm/test_multinode_ray.py saw when node2 died mid-extraction: Ray Data stops the pool with
    ActorUnavailableError and a gRPC address; the run's one line says what happened instead."""
    from cratescale.embeddings.pool import failure_cause

    err = RuntimeError("ray.exceptions.ActorUnavailableError: The actor 6827 is unavailable: The actor is "
                       "temporarily unavailable: RpcError: RPC error: failed to connect to all addresses; last "
                       "error: UNKNOWN: ipv4:10.77.0.12:18840: Failed to connect to remote host")
    assert failure_cause(err) == "an actor became unreachable (its node was lost or cut off)"
