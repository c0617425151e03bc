"""DALI (CPU) and PIL loaders on real ImageNet photos: agreement, determinism, resume, bad files."""
from __future__ import annotations

import re
import shutil
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline import loader as loader_mod
from data_pipeline.ingest import ingest
from data_pipeline.loader import make_eval_loader, make_train_loader
from data_pipeline.sampler import LoaderState, SamplerError
from tests.unit.data_fixtures import GREYSCALE, imagenet_folder, imagenet_members

needs_dali = pytest.mark.skipif(not loader_mod.dali_available(), reason="nvidia.dali not installed")
SIZE, PATCHES = 32, 16


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = imagenet_folder(tmp_path_factory.mktemp("img") / "tree", n=30)  # 32 photos, 2 greyscale
    return ingest(str(root), tmp_path_factory.mktemp("out"), workers=0, progress=False)


def _train(manifest, kind, state=LoaderState(0, 0, 0), rank=0, world_size=1, global_batch=8, micro_batch=4,
           **kw):
    return make_train_loader(manifest, state=state, rank=rank, world_size=world_size, global_batch=global_batch,
                             micro_batch=micro_batch, image_size=SIZE, num_patches=PATCHES, kind=kind, **kw)


def _take(loader, n):
    out = [next(loader) for _ in range(n)]
    return out


@needs_dali
def test_dali_and_pil_agree(manifest):
    batches = {}
    for kind in ("pil", "dali"):
        with _train(manifest, kind, rank=1, world_size=2, global_batch=16, micro_batch=4, num_threads=2) as ld:
            batches[kind] = _take(ld, 4)
            assert ld.state() == LoaderState(1, 0, 0)  # 2 micro-batches a step per rank, 2 steps an epoch
    for p, d in zip(batches["pil"], batches["dali"]):
        assert set(p) == set(d) == {"images", "labels", "sample_ids", "mask_noise"}
        assert p["images"].shape == d["images"].shape == (4, 3, SIZE, SIZE)
        assert d["images"].dtype == torch.float32 and d["labels"].dtype == torch.int64
        assert torch.equal(p["sample_ids"], d["sample_ids"]) and torch.equal(p["labels"], d["labels"])
        assert torch.equal(p["mask_noise"], d["mask_noise"]) and d["mask_noise"].dtype == torch.float32
        corr = np.corrcoef(p["images"].flatten(), d["images"].flatten())[0, 1]
        assert corr > 0.99 and (p["images"] - d["images"]).abs().mean() < 0.05


@needs_dali
def test_dali_prefetch_depth_changes_how_far_ahead_not_what(manifest):
    with _train(manifest, "dali") as shallow, _train(manifest, "dali", prefetch_depth=4) as deep:
        assert deep._backend.pipe.prefetch_queue_depth == 4 and shallow._backend.pipe.prefetch_queue_depth == 2
        for a, b in zip(_take(shallow, 3), _take(deep, 3)):
            assert torch.equal(a["sample_ids"], b["sample_ids"]) and torch.equal(a["images"], b["images"])


@needs_dali
def test_dali_batches_identical_for_the_same_state(manifest):
    with _train(manifest, "dali") as a:
        run = _take(a, 4)
        mid_state = None
        assert a.state() == LoaderState(0, 16, 0)
    mid_state = LoaderState.from_step(1, steps_per_epoch=4, global_batch=8, seed=0)
    with _train(manifest, "dali", state=mid_state) as b:
        resumed = _take(b, 2)
    for x, y in zip(run[2:], resumed):
        for k in x:
            assert torch.equal(x[k], y[k]), k
    assert not torch.equal(run[0]["images"], run[2]["images"])


def _global_sequence(manifest, world_size, micro_batch, steps, state):
    """Concatenate every rank's micro-batches per global step (what all ranks see together)."""
    loaders = [_train(manifest, "pil", state=state, rank=r, world_size=world_size, micro_batch=micro_batch)
               for r in range(world_size)]
    accum = 8 // world_size // micro_batch
    seq = []
    for _ in range(steps):
        for ld in loaders:
            for _ in range(accum):
                b = next(ld)
                seq += [(int(i), b["images"][j], b["mask_noise"][j]) for j, i in enumerate(b["sample_ids"])]
    states = {ld.state() for ld in loaders}
    for ld in loaders:
        ld.close()
    assert len(states) == 1
    return seq, states.pop()


def test_resume_on_another_world_size_is_exact(manifest):
    reference, _ = _global_sequence(manifest, 1, 4, 7, LoaderState(0, 0, 0))
    first, state = _global_sequence(manifest, 2, 2, 3, LoaderState(0, 0, 0))
    assert state == LoaderState(0, 24, 0)
    rest, end = _global_sequence(manifest, 4, 1, 4, LoaderState.from_dict(state.to_dict()))
    assert end == LoaderState(1, 24, 0)  # 4 steps per epoch: crossed into epoch 1
    got = first + rest
    assert [x[0] for x in got] == [x[0] for x in reference]
    for (_, img_a, noise_a), (_, img_b, noise_b) in zip(got, reference):
        assert torch.equal(img_a, img_b) and torch.equal(noise_a, noise_b)
    assert sorted(x[0] for x in reference[:32]) == list(range(32))  # epoch 0 covers every sample once


@pytest.mark.parametrize("kind", ["pil", pytest.param("dali", marks=needs_dali)])
def test_greyscale_comes_out_rgb(manifest, kind):
    table = pq.read_table(manifest).to_pylist()
    rows = np.array([i for i, r in enumerate(table) if r["key"] in {g.split("/", 1)[1] for g in GREYSCALE}])
    assert len(rows) == 2
    (batch,) = list(make_eval_loader(manifest, rows, batch_size=2, image_size=SIZE, kind=kind))
    assert batch["images"].shape == (2, 3, SIZE, SIZE) and "mask_noise" not in batch
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = batch["images"] * std + mean
    assert (pixels[:, 0] - pixels[:, 1]).abs().max() < 0.02 and (pixels[:, 1] - pixels[:, 2]).abs().max() < 0.02


@needs_dali
def test_cmyk_jpeg_decodes_to_the_same_rgb(tmp_path):
    import io

    from PIL import Image

    (tmp_path / "src" / "n0").mkdir(parents=True)
    photo = Image.open(io.BytesIO(imagenet_members(1, with_greyscale=False)[0][1]))
    photo.convert("CMYK").save(tmp_path / "src" / "n0" / "cmyk.jpg", quality=95)
    m = ingest(str(tmp_path / "src"), tmp_path / "out", workers=0, progress=False)
    out = {k: next(iter(make_eval_loader(m, np.array([0]), 1, SIZE, kind=k)))["images"] for k in ("pil", "dali")}
    assert out["dali"].shape == (1, 3, SIZE, SIZE)
    assert (out["pil"] - out["dali"]).abs().mean() < 0.05


@pytest.mark.parametrize("kind", ["pil", pytest.param("dali", marks=needs_dali)])
def test_corrupt_file_at_train_time_is_replaced_and_counted(manifest, tmp_path, kind):
    shutil.copy(manifest, tmp_path / "manifest.parquet")
    rows = pq.read_table(manifest).to_pylist()
    # Damage two files after ingest: one truncated, one overwritten with garbage of the same size.
    for r, damage in ((rows[3], "truncate"), (rows[17], "garbage")):
        copy = tmp_path / f"{r['sample_id']}.JPEG"
        data = open(r["path"], "rb").read()
        copy.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\0" * len(data))
        r["path"] = str(copy)
    pq.write_table(pq.read_table(manifest).from_pylist(rows, schema=pq.read_schema(manifest)),
                   tmp_path / "manifest.parquet")
    with _train(tmp_path / "manifest.parquet", kind, micro_batch=8) as ld:
        ids = torch.cat([next(ld)["sample_ids"] for _ in range(4)]).tolist()  # one full epoch
        assert ld.bad_samples == 2
    assert 3 not in ids and 17 not in ids and len(ids) == 32 and len(set(ids)) == 30


@pytest.mark.parametrize("kind,replaced", [("pil", 1), pytest.param("dali", 0, marks=needs_dali)])
def test_scrambled_entropy_data_never_stops_a_run(manifest, tmp_path, kind, replaced):
    # Garbage inside the entropy-coded data passes the cheap SOI/EOI/size check. libjpeg-turbo in
    # DALI decodes it (with a warning); PIL raises, so the PIL backend replaces the sample.
    rows = pq.read_table(manifest).to_pylist()
    data = bytearray(open(rows[5]["path"], "rb").read())
    third = len(data) // 3
    data[third:2 * third] = np.random.default_rng(0).integers(0, 256, third, dtype=np.uint8).tobytes()
    (tmp_path / "scrambled.JPEG").write_bytes(bytes(data))
    rows[5]["path"] = str(tmp_path / "scrambled.JPEG")
    pq.write_table(pq.read_table(manifest).from_pylist(rows, schema=pq.read_schema(manifest)),
                   tmp_path / "manifest.parquet")
    with _train(tmp_path / "manifest.parquet", kind, micro_batch=8) as ld:
        ids = torch.cat([next(ld)["sample_ids"] for _ in range(4)]).tolist()
        assert ld.bad_samples == replaced and len(ids) == 32 and (5 in ids) == (replaced == 0)


@pytest.mark.parametrize("kind", ["pil", pytest.param("dali", marks=needs_dali)])
def test_eval_loader_keeps_order_and_last_batch(manifest, kind):
    rows = np.array([5, 3, 7, 0, 31])
    batches = list(make_eval_loader(manifest, rows, batch_size=2, image_size=SIZE, kind=kind))
    assert [len(b["sample_ids"]) for b in batches] == [2, 2, 1]
    ids = torch.cat([b["sample_ids"] for b in batches]).tolist()
    assert ids == pq.read_table(manifest)["sample_id"].to_numpy()[rows].tolist()
    assert all(b["images"].shape[1:] == (3, SIZE, SIZE) for b in batches)


def test_auto_kind_and_argument_errors(manifest, monkeypatch):
    assert loader_mod.resolve_kind("auto") == ("dali" if loader_mod.dali_available() else "pil")
    # A broken DALI install: the import error is what `auto` reports as its reason, not swallowed.
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # `import nvidia.dali` now raises ImportError
    choice = loader_mod.choose_decoder("auto")
    assert choice.kind == "pil" and choice.identity.startswith("PIL ")
    halted = "ModuleNotFoundError: import of nvidia.dali halted; None in sys.modules"
    assert choice.why == f"auto: nvidia.dali not importable ({halted})"
    with pytest.raises(ValueError, match=re.escape(f"not importable ({halted})")):
        loader_mod.resolve_kind("dali")
    with pytest.raises(SamplerError, match="must equal micro_batch"):
        _train(manifest, "pil", global_batch=8, micro_batch=3)
    with pytest.raises(SamplerError, match="no rows with split"):
        _train(manifest, "pil", split="val")
    with pytest.raises(ValueError, match="row indices"):
        make_eval_loader(manifest, np.array([99]), batch_size=2, image_size=SIZE, kind="pil")


@pytest.mark.gpu
@needs_dali
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("hw_decoder_load", [0.0, 0.9])  # CUDA path only, mostly the hardware JPEG engines
def test_mixed_gpu_decoder_matches_cpu(manifest, hw_decoder_load):
    with _train(manifest, "dali", device="cpu") as c, \
            _train(manifest, "dali", device="gpu", hw_decoder_load=hw_decoder_load) as g:
        for a, b in zip(_take(c, 2), _take(g, 2)):
            assert b["images"].is_cuda and torch.equal(a["sample_ids"], b["sample_ids"])
            assert np.corrcoef(a["images"].flatten(), b["images"].cpu().flatten())[0, 1] > 0.99


@pytest.fixture
def scrambled_folder(tmp_path):
    """64 small synthetic JPEGs as files, two with the middle third of their bytes scrambled: SOI/EOI and size
    intact, so they pass the feed's byte check, and neither DALI (a critical pipeline error) nor PIL decodes them."""
    return scrambled_copy(tmp_path, lambda n: [5, 40])


def scrambled_copy(tmp_path, pick):
    """(manifest, scrambled sample ids) of 64 small synthetic JPEG files, the rows `pick(64)` names scrambled."""
    from data_pipeline.reader import ByteReader

    synthetic = ingest("synthetic://shapes?n=64&classes=4&size=32&seed=1", tmp_path / "syn", workers=0,
                       progress=False)
    reader = ByteReader()
    for r in pq.read_table(synthetic).to_pylist():
        path = tmp_path / "src" / r["class_name"] / f"{r['sample_id']:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(reader.read(r["path"], r["offset"], r["size"]))
    m = ingest(str(tmp_path / "src"), tmp_path / "data", workers=0, progress=False)
    rows = pq.read_table(m).to_pylist()
    picked = [int(row) for row in pick(len(rows))]
    for row in picked:
        data = bytearray(open(rows[row]["path"], "rb").read())
        third = len(data) // 3
        data[third:2 * third] = np.random.default_rng(row).integers(0, 256, third, dtype=np.uint8).tobytes()
        open(rows[row]["path"], "wb").write(bytes(data))
    return m, [rows[row]["sample_id"] for row in picked]


def two_epochs_on_both_loaders(m):
    """({kind: (sample ids of 2 epochs of 64, bad samples)}, DALI's recoveries)."""
    seen = {}
    for kind in ("pil", "dali"):
        with _train(m, kind, state=LoaderState(0, 0, 3), global_batch=16, micro_batch=8) as ld:
            seen[kind] = (torch.cat([next(ld)["sample_ids"] for _ in range(16)]).tolist(), ld.bad_samples)
            if kind == "dali":
                recoveries = ld._backend.recoveries
    return seen, recoveries


@needs_dali
def test_dali_recovers_from_a_jpeg_that_ends_its_pipeline(scrambled_folder, capfd):
    m, scrambled = scrambled_folder
    seen, recoveries = two_epochs_on_both_loaders(m)
    ids, bad = seen["dali"]
    assert seen["dali"] == seen["pil"]  # the same replacements, in the same places, counted the same
    assert bad == recoveries == 4 and not set(ids) & set(scrambled) and len(ids) == 128  # 2 files x 2 epochs
    err = capfd.readouterr().err
    assert err.count("did not decode (nvImageCodec failure") == 4 and "0005.jpg" in err
    # Evaluation: the row keeps its place and is marked invalid; the rows after it are decoded as before.
    rows = np.arange(64)
    ev = list(make_eval_loader(m, rows, batch_size=16, image_size=SIZE, kind="dali"))
    valid = torch.cat([b["valid"] for b in ev])
    assert torch.cat([b["sample_ids"] for b in ev]).tolist() == pq.read_table(m)["sample_id"].to_pylist()
    assert (~valid).nonzero().flatten().tolist() == [5, 40]


@needs_dali
def test_undecodable_samples_side_by_side_give_the_same_replacements_on_both_loaders(tmp_path, capfd):
    """Issue 29.5: 30% of a small set undecodable, in runs of up to 5 side by side in the epoch's order, so a
    replacement is itself undecodable, and the next: PIL moves on to the next replacement as DALI does (before:
    the second failure in a row left PIL's loader as a traceback)."""
    from data_pipeline.sampler import GlobalSampler

    runs = [1, 2, 3, 4, 5, 9, 10, 17, 18, 19, 30, 31, 32, 33, 40, 50, 51, 60, 61]  # epoch 0 positions: 19 of 64
    m, scrambled = scrambled_copy(tmp_path, lambda n: GlobalSampler(n, 3, 16).permutation(0)[runs])
    seen, recoveries = two_epochs_on_both_loaders(m)
    ids, bad = seen["dali"]
    assert seen["dali"] == seen["pil"]  # the same sample ids in the same places, counted the same
    assert not set(ids) & set(scrambled) and len(ids) == 128 and bad == 2 * len(runs)  # 2 epochs
    assert recoveries > bad  # replacements that did not decode either: chains, not isolated failures
    assert capfd.readouterr().err.count("did not decode") == recoveries


@needs_dali
def test_a_sample_that_crashes_the_decoder_is_found_in_a_child(scrambled_folder):
    """Issue 29.5: a decoder that dies by a signal on a sample (measured: DALI's executor thread segfaulting on
    damaged CIFAR JPEGs; not reproduced on the small sets here) kills the forked checking child, not the rank:
    the sample the child was decoding is named and replaced like any undecodable one. The crash is a real
    SIGSEGV, raised in the decoding process when it reaches sample 13 (before: the rank itself died)."""
    import os
    import signal

    from data_pipeline.dali_loader import first_undecodable
    from data_pipeline.feed import SampleFeed

    class CrashesAt13(SampleFeed):
        def __call__(self, sample_info):
            if self.offset + int(sample_info.idx_in_epoch) == 13:
                os.kill(os.getpid(), signal.SIGSEGV)
            return super().__call__(sample_info)

    m, _ = scrambled_folder
    feed = CrashesAt13(str(m), mode="train", seed=3, global_batch=8, num_patches=PATCHES)
    args = dict(feed=feed, batch_size=8, image_size=SIZE, num_threads=1, device="cpu", py_workers=1, decode="roi")
    assert first_undecodable(args, 8, 16, RuntimeError("pipeline ended")) == (13, "crashed the decoder (SIGSEGV)")


@needs_dali
def test_dali_past_its_recovery_limit_ends_with_the_bad_data_line(tmp_path):
    """Every sample undecodable: DALI's 64 recoveries in one batch are spent, and the loader ends with the
    bad-data line as a ValueError (launch/failures.py: deterministic, not retried); before, a RuntimeError."""
    from data_pipeline.dali_loader import UndecodableData

    m, _ = scrambled_copy(tmp_path, lambda n: range(n))
    with _train(m, "dali", global_batch=8, micro_batch=8) as ld, pytest.raises(UndecodableData) as err:
        next(ld)
    line = str(err.value)
    assert line.startswith("bad data: 64 undecodable samples within one batch from sample 0 (DALI); first: ")
    assert line.count("(decode error)") == 5 and "\n" not in line
