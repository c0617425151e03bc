"""The DALI GPU path's CPU-visible parts: the batch hand-off's stream, the workers' start method once CUDA is
initialised, and the guarded crop-window decode (data.gpu_decode: auto | roi | full). What needs a GPU to show
(mixed decode pixels, the stream race under grad_accum 2, the probe against nvImageCodec) is in bench/gpu.sh's
correctness section (bench/gpu_check.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline import dali_loader, gpu_decode
from data_pipeline import loader as loader_mod
from data_pipeline.ingest import ingest
from data_pipeline.loader import make_train_loader
from data_pipeline.sampler import LoaderState
from tests.unit import probe_targets
from tests.unit.data_fixtures import imagenet_folder

needs_dali = pytest.mark.skipif(not loader_mod.dali_available(), reason="nvidia.dali not installed")
SIZE = 32


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = imagenet_folder(tmp_path_factory.mktemp("img") / "tree", n=10)
    return ingest(str(root), tmp_path_factory.mktemp("out"), workers=0, progress=False)


def _train(manifest, **kw):
    return make_train_loader(manifest, state=LoaderState(0, 0, 0), rank=0, world_size=1, global_batch=8,
                             micro_batch=4, image_size=SIZE, num_patches=4, kind="dali", **kw)


# ---- the hand-off --------------------------------------------------------------------------------------
@needs_dali
def test_gpu_batch_is_copied_on_torchs_current_stream(monkeypatch):
    """Stands in for a GPU: a batch whose type is named TensorListGPU (holding a real DALI CPU tensor list) and
    a recorder around DALI's real feed_ndarray; the CUDA device and stream are replaced by the CPU and a
    marker. The copy must be ordered on torch's current stream (the marker), not on DALI's own."""
    from nvidia.dali import tensors
    from nvidia.dali.plugin import pytorch as dali_torch

    data = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)

    class TensorListGPU:  # the name _to_torch dispatches on
        def as_tensor(self):
            return tensors.TensorListCPU(data).as_tensor()

    calls, real_feed = [], dali_torch.feed_ndarray

    def recording_feed(t, out, cuda_stream=None):
        calls.append(cuda_stream)
        return real_feed(t, out)  # the CPU copy; on a GPU this is copy_to_external on cuda_stream

    stream = object()  # torch.cuda.current_stream() on a GPU
    monkeypatch.setattr(dali_torch, "feed_ndarray", recording_feed)
    monkeypatch.setattr(dali_loader, "_cuda_target", lambda: (torch.device("cpu"), stream))
    out = dali_loader._to_torch(TensorListGPU())
    assert calls == [stream]
    assert torch.equal(out, torch.from_numpy(data))


# ---- worker start method -------------------------------------------------------------------------------
def test_start_method_is_spawn_once_cuda_is_initialised():
    assert dali_loader.worker_start_method("cpu", driver_initialised=False) == "fork"
    assert dali_loader.worker_start_method("cpu", driver_initialised=True) == "spawn"
    assert dali_loader.worker_start_method("gpu", driver_initialised=False) == "spawn"


@needs_dali
def test_cpu_pipeline_starts_after_cuda_was_initialised(manifest, monkeypatch):
    """Stands in for a GPU node: DALI's own driver check (nvidia.dali.backend.IsDriverInitialized, which
    torch.cuda.is_available() makes true there) answers True. DALI's worker pool then refuses fork, as it
    would on the node; the CPU pipeline must start its workers with spawn and give the same batches."""
    from nvidia.dali import backend

    with _train(manifest, device="cpu") as forked:
        expected = [next(forked) for _ in range(2)]
        assert forked._backend.pipe._py_start_method == "fork"
    monkeypatch.setattr(backend, "IsDriverInitialized", lambda: True)
    with _train(manifest, device="cpu") as spawned:
        assert spawned._backend.pipe._py_start_method == "spawn"
        for a, b in zip(expected, [next(spawned) for _ in range(2)]):
            assert torch.equal(a["sample_ids"], b["sample_ids"]) and torch.equal(a["images"], b["images"])


# ---- the guarded crop decode ---------------------------------------------------------------------------
def _never():
    raise AssertionError("the probe must not run")


def test_route_rules():
    assert gpu_decode.choose_route("auto", "cpu", _never) == {"setting": "auto", "device": "cpu", "decode": "roi",
                                                              "fallbacks": 0}
    assert gpu_decode.choose_route("full", "cpu", _never)["decode"] == "full"  # forced routes apply anywhere
    assert gpu_decode.choose_route("roi", "gpu", _never)["decode"] == "roi"
    assert gpu_decode.choose_route("full", "gpu", _never)["decode"] == "full"
    assert gpu_decode.choose_route("auto", "gpu", lambda: None) == {"setting": "auto", "device": "gpu",
                                                                    "decode": "roi", "fallbacks": 0}
    fell = gpu_decode.choose_route("auto", "gpu", lambda: "killed by SIGSEGV")
    assert fell == {"setting": "auto", "device": "gpu", "decode": "full", "fallbacks": 1,
                    "reason": "killed by SIGSEGV"}
    assert "killed by SIGSEGV" in gpu_decode.describe(fell) and "full images + GPU slice" in gpu_decode.describe(fell)
    with pytest.raises(ValueError, match="gpu_decode must be one of"):
        gpu_decode.choose_route("fast", "gpu", _never)


def test_the_probe_runs_once_per_gpu_per_process(monkeypatch):
    """Extraction and evaluation build a loader per shard: only the first one on a GPU pays the probe."""
    calls = []
    monkeypatch.setattr(gpu_decode, "_PROBED", {})
    monkeypatch.setattr(gpu_decode, "probe_crop_decode", lambda args: calls.append(args["device_id"]) or "crashed")
    assert [gpu_decode.probe_once({"device_id": d}) for d in (0, 0, 1, 0)] == ["crashed"] * 4
    assert calls == [0, 1]


def test_isolated_probe_survives_a_segfault_and_reports_errors_in_one_line():
    assert gpu_decode.run_isolated(probe_targets.ok, (), 60) is None
    assert gpu_decode.run_isolated(probe_targets.segfault, (), 60) == "killed by SIGSEGV"
    assert gpu_decode.run_isolated(probe_targets.fail, (), 60) == "ValueError: nvImageCodec: unsupported sampling"


@needs_dali
def test_crop_decode_probe_runs_the_real_pipeline(manifest):
    """The probe's child builds and runs the crop-window pipeline (the CPU decoder here) from the feed."""
    with _train(manifest, device="cpu") as ld:
        args = dict(feed=ld.feed, batch_size=4, image_size=SIZE, num_threads=1, device="cpu", py_workers=1)
        assert gpu_decode.probe_crop_decode(args, timeout_s=120) is None
        assert ld.decode_route == {"setting": "auto", "device": "cpu", "decode": "roi", "fallbacks": 0}
    # a pipeline that cannot even be built is a failed probe, in one line
    assert gpu_decode.probe_crop_decode({**args, "feed": None}, timeout_s=120).startswith("AttributeError: ")


@needs_dali
def test_full_decode_then_slice_matches_the_crop_window_decode(manifest):
    """The fallback route (whole image, then the same window sliced out) gives the crop-window route's pixels
    within the JPEG decoders' tolerance (chroma upsampling at the window's edge)."""
    with _train(manifest, device="cpu") as ld:
        pipes = {d: dali_loader.build_pipeline(ld.feed, 4, SIZE, 1, "cpu", 1, decode=d) for d in ("roi", "full")}
        try:
            for _ in range(2):
                roi, full = (np.array(pipes[d].run()[0].as_tensor()) for d in ("roi", "full"))
                assert roi.shape == full.shape == (4, 3, SIZE, SIZE)
                assert np.abs(roi - full).mean() < 0.05 and np.corrcoef(roi.ravel(), full.ravel())[0, 1] > 0.99
        finally:
            for pipe in pipes.values():
                dali_loader.close_pipeline(pipe)
    with pytest.raises(ValueError, match="decode must be 'roi' or 'full'"):
        dali_loader.build_pipeline(ld.feed, 4, SIZE, 1, "cpu", 1, decode="both")
