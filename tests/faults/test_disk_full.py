"""Disk full while the real 2-rank trainer checkpoints, and while an extraction writes its store.

Real ENOSPC from a small tmpfs mounted over the checkpoint dir / the store (we run as root; where `mount` is
refused those two tests skip and the write-layer injections below still run). Every failure must be one
line naming the step or shard and ENOSPC; the previous commit stays the newest, nothing half-written stays
visible, the space is given back, and the job resumes once there is room again.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from cratescale.checkpoint import CheckpointStore
from tests.dist.harness import write_config
from tests.faults.conftest import REPO, TINY_JOB
from tests.tmpfs import mounted_tmpfs, resize_tmpfs

pytestmark = pytest.mark.dist
ERROR = "cratescale.checkpoint.commit.CheckpointWriteError: checkpoint step 3"
ENOSPC = "OSError: [Errno 28] No space left on device"


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


class Reader(threading.Thread):
    """A reader polling the store while the ranks write: latest() must always load and verify."""

    def __init__(self, root: Path):
        super().__init__(daemon=True)
        self.root, self.stop, self.checks, self.errors = root, threading.Event(), 0, []

    def run(self) -> None:
        store = CheckpointStore(self.root)
        while not self.stop.is_set():
            try:
                commit = store.latest()
                if commit is not None:
                    store.verify(commit)
                self.checks += 1
            except Exception as exc:  # noqa: BLE001 - any reader failure is a finding
                self.errors.append(f"{type(exc).__name__}: {exc}")


def test_trainer_checkpoint_on_a_full_tmpfs(tmp_path, fault_manifest, rank_server):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    # A commit of the tiny model is ~1.3 MB: two fit in 3 MiB, the third (before retention frees one) does not.
    # The asynchronous commit: the write fails in the background writers, the error comes at the next step.
    config = write_config(TINY_JOB, run_dir, ["checkpoint.every_steps=1", "checkpoint.keep_last=2",
                                              "schedule.steps=8", "checkpoint.async_commit=true"])
    with mounted_tmpfs(root, "3m"):
        free_empty = _free(root)
        reader = Reader(root)
        reader.start()
        job = rank_server.start(config, fault_manifest, 2)
        codes = job.wait()
        reader.stop.set()
        reader.join()
        assert codes == [1, 1], f"{codes}\n{job.output(0)}"
        for rank in (0, 1):
            line = _last_line(job.output(rank))
            assert line.startswith(ERROR) and ENOSPC in line, line
        assert "step_000000003.tmp" in _last_line(job.output(0))
        store = CheckpointStore(root)
        assert store.latest().step == 2 and store.latest_pointer() == "step_000000002"
        for commit in store.commits():
            store.verify(commit)
        assert sorted(os.listdir(root)) == ["catalog.parquet", "incarnation", "latest", "step_000000001",
                                              "step_000000002"]
        assert reader.errors == [] and reader.checks > 0
        # The partial third save was ~1 MB: its space is back (only the two commits and ~pages of slack use it).
        assert _free(root) + sum(c.bytes for c in store.commits()) + (256 << 10) >= free_empty
        # Room again: the same job resumes from step 2 and finishes.
        resize_tmpfs(root, "16m")
        job = rank_server.start(config, fault_manifest, 2)
        assert job.wait() == [0, 0], job.output(0)
        assert job.result(0)["step"] == 8 and store.latest().step == 8
        store.verify(store.latest())


@pytest.mark.parametrize("rank, match, background", [(1, "optim_states", False), (0, "model_states", False),
                                                    (1, "rng", False), (0, "rng", False),
                                                    (1, "optim_states", True), (0, "model_states", True)],
                         ids=["rank1-zero-shard", "rank0-model", "rank1-rng", "rank0-rng", "async-rank1-zero-shard",
                              "async-rank0-model"])
def test_trainer_enospc_injected_on_one_rank(tmp_path, fault_manifest, rank_server, rank, match, background):
    """ENOSPC on ONE rank (its share of a node-local disk), inside and after DeepSpeed's save: the other rank
    must not be left waiting in one of DeepSpeed's barriers; both stop with the same one-line error. With the
    asynchronous commit the write fails in the rank's background writer and surfaces at the next step."""
    run_dir = tmp_path / "run"
    config = write_config(TINY_JOB, run_dir, ["checkpoint.every_steps=1", "checkpoint.keep_last=2",
                                              "schedule.steps=8", f"checkpoint.async_commit={background}".lower()])
    job = rank_server.start(config, fault_manifest, 2, faults={"mode": "enospc", "rank": rank, "step": 3,
                                                               "match": match})
    codes = job.wait(timeout=120)
    assert codes == [1, 1], f"exit {codes} (negative: a rank hung and was killed)\n{job.output(0)}"
    lines = [_last_line(job.output(r)) for r in (0, 1)]
    assert all(line.startswith(ERROR) and f"rank {rank}: {ENOSPC}" in line and match in line for line in lines)
    store = CheckpointStore(run_dir / "checkpoints")
    assert store.latest().step == 2 and not store.tmp_path(3).exists()
    assert sorted(os.listdir(store.root)) == ["catalog.parquet", "incarnation", "latest", "step_000000001",
                                              "step_000000002"]


# ---- the embedding store --------------------------------------------------------------------------------
COMMON = ["--actors", "0", "--layers", "1", "--shard-rows", "4", "--chunk-rows", "4", "--batch-size", "4",
          "--loader", "pil", "--dtype", "float32"]
OPTS = dict(actors=0, layers=(1,), shard_rows=4, chunk_rows=4, batch_size=4, loader_kind="pil", dtype="float32")


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    import torch

    from cratescale.checkpoint.export import export_weights
    from cratescale.models import create_model
    from data_pipeline.ingest import ingest

    root = tmp_path_factory.mktemp("store_full")
    manifest = ingest("synthetic://shapes?n=64&classes=4&size=32&seed=2", root / "data", workers=0, progress=False)
    torch.manual_seed(0)
    model = create_model("crate_mae_debug")
    export_weights(model.state_dict(), model.config, {"step": 1}, root / "export")
    return root, Path(manifest)


@pytest.fixture
def one_torch_thread():
    """In-process extraction on one thread, as the CLI runs below (OMP_NUM_THREADS=1): on this CPU (AVX-512,
    AMX) torch's kernels give other low bits on 1 and 2 threads, so byte-identical holds per thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _extract(root: Path, manifest: Path, store: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cratescale.embeddings", "extract", str(root / "export"),
                           str(manifest), str(store), *COMMON], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"), timeout=300)


def test_embedding_store_on_a_full_tmpfs(small_export, one_torch_thread):
    from cratescale.embeddings.store import EmbeddingStore

    from cratescale.embeddings.extract import extract

    root, manifest = small_export
    extract(root / "export", manifest, root / "ref", **OPTS)  # in-process: the same code as the CLI, no start-up
    with mounted_tmpfs(root / "mnt", "240k") as mnt:   # the full store needs ~420 kB: room for about half
        full = _extract(root, manifest, mnt / "store")
        assert full.returncode == 2, full.stderr[-2000:]
        line = full.stderr.strip()
        assert "\n" not in line and line.startswith(f"error: {mnt / 'store'}: shard ") and ENOSPC in line, line
        failed = int(line.split("shard ")[1].split(":")[0])
        store = EmbeddingStore(mnt / "store")
        done = sorted(store.committed())
        assert done == list(range(failed)) and 0 < failed < store.info.num_shards
        assert store.verify() == []
        # Nothing of the failed shard is left: no feature shard file, no metadata, no marker, no tmp file.
        for name in store.info.dims:
            assert not (mnt / "store" / "features.zarr" / name / "c" / str(failed)).exists(), name
            rows = store.read(name)
            assert np.isnan(rows[failed * 4:]).all() and not np.isnan(rows[:failed * 4]).any()
        assert sorted(os.listdir(mnt / "store" / "metadata")) == [f"shard_{k:06d}.parquet" for k in done]
        assert sorted(os.listdir(mnt / "store" / "commits")) == [f"shard_{k:06d}.json" for k in done]
        # Room again: the rerun completes the store, byte-identical to one written in one go.
        resize_tmpfs(mnt, "4m")
        extract(root / "export", manifest, mnt / "store", **OPTS)
        want = {str(p.relative_to(root / "ref")): p.read_bytes() for p in (root / "ref").rglob("*") if p.is_file()}
        got = {str(p.relative_to(mnt / "store")): p.read_bytes() for p in (mnt / "store").rglob("*") if p.is_file()}
        assert sorted(got) == sorted(want) and [k for k in want if want[k] != got[k]] == []


def test_embedding_store_enospc_injected_at_the_marker(small_export, monkeypatch, tmp_path):
    """Runs everywhere (also where mount is refused): ENOSPC on the commit marker of shard 2."""
    import errno

    from cratescale.embeddings import store as store_mod
    from cratescale.embeddings.extract import extract

    root, manifest = small_export
    real = store_mod.replace_durable

    def full_disk(path: Path, data: bytes, hidden: bool = False) -> None:
        if path.name == "shard_000002.json":
            with open(path.parent / f".{path.name}.tmp{os.getpid()}", "wb") as f:
                f.write(data[:5])  # a torn tmp file, as a real ENOSPC mid-write leaves it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data, hidden)

    monkeypatch.setattr(store_mod, "replace_durable", full_disk)
    with pytest.raises(store_mod.StoreWriteError, match=r"shard 2: write failed.*Errno 28\] No space left"):
        extract(root / "export", manifest, tmp_path / "s", **OPTS)
    store = store_mod.EmbeddingStore(tmp_path / "s")
    assert sorted(store.committed()) == [0, 1] and store.verify() == []
    assert sorted(os.listdir(tmp_path / "s" / "commits")) == ["shard_000000.json", "shard_000001.json"]
    assert sorted(os.listdir(tmp_path / "s" / "metadata")) == ["shard_000000.parquet", "shard_000001.parquet"]
    assert np.isnan(store.read("cls")[8:12]).all()
