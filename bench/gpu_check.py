"""The correctness section of bench/gpu.sh (issue 15): what only a GPU can show about the GPU path, checked in
about two minutes before any speed row, so a lent GPU finds these first.

    python3 -m bench.gpu_check [--data .gpudata] [--out-dir DIR] [--budget 120]
    python3 -m bench.gpu_check --cpu-smoke [--data DIR_OR_TAR]   # same code, CPU routes on both sides

Checks, in order (each one row: pass / FAIL / skipped with the reason; a crash in one is its FAIL):
  binding      this rank's GPU (distributed/device.py) and nccl; a child with CUDA hidden and GPUs asked must stop
  auto probe   what data.gpu_decode=auto picks on this GPU (the probe runs roi in a child: nvImageCodec #55);
               if roi fails there, the checks below decode with full (a crash in this process would end them)
  mixed 0/0.75 DALI mixed decode at hw_decoder_load 0 (CUDA path) and 0.75 (mostly the hardware JPEG engines)
               against the CPU decoder, pixels of the same samples, on real JPEGs
  routes       data.gpu_decode roi (crop-window decoder, nvImageCodec) against full (decode + GPU slice)
  grad_accum 2 training micro-steps (forward + backward between batches, so torch's allocator recycles blocks
               while batches arrive): each batch as the step saw it against the CPU route's pixels (the stream
               of the DALI -> torch hand-off)
  extraction   2 Ray extraction actors, extract.gpus_per_actor each (one GPU each where there are two), bf16
Results: gpu_check.{md,json} in --out-dir ($OUT, else bench/results/). Exit 1 when a check FAILs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench.gpu_decode import load_jpegs

REPO = Path(__file__).resolve().parents[1]

# Pixels after normalisation (units of the ImageNet std, ~58 grey levels): nvJPEG and libjpeg-turbo differ in
# IDCT rounding and chroma upsampling by a grey level or two, the window edges of a ROI decode by a little more.
MEAN_ABS_TOL, MIN_CORR = 0.05, 0.99


class Skip(Exception):
    """A check that cannot run here; its message says why."""


class Checks:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.rows = args, []
        self.gpu = "cpu" if args.cpu_smoke else "gpu"
        self.deadline = time.monotonic() + args.budget
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self._manifest: Path | None = None
        self.roi_failed: str | None = None  # why the crop-window decoder failed its probe here, if it did
        from cratescale.models import create_model

        with torch.device("meta"):
            self.num_patches = create_model(args.model, img_size=args.image_size).num_patches

    def run(self, name: str, fn: Callable[[], str]) -> None:
        t0 = time.monotonic()
        if t0 > self.deadline:
            status, note = "skipped", f"skipped: the {self.args.budget:.0f} s budget is spent"
        else:
            try:
                status, note = "pass", fn()
            except Skip as why:
                status, note = "skipped", f"skipped: {why}"
            except Exception as exc:  # noqa: BLE001 - a check that crashes is a failed check
                status, note = "FAIL", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
        row = {"check": name, "status": status, "seconds": round(time.monotonic() - t0, 2), "note": note}
        self.rows.append(row)
        print(f"[gpu_check] {status:7s} {name}: {note} ({row['seconds']} s)", flush=True)
        self.flush()

    def flush(self) -> None:
        out = Path(self.args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "cuda": torch.version.cuda, "cpu_smoke": self.args.cpu_smoke,
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no GPU)"}
        (out / "gpu_check.json").write_text(json.dumps({"meta": meta, "rows": self.rows}, indent=1))
        lines = ["| check | status | seconds | note |", "|---|---|---|---|"]
        lines += [f"| {r['check']} | {r['status']} | {r['seconds']} | {r['note']} |" for r in self.rows]
        (out / "gpu_check.md").write_text("\n".join(lines) + "\n")

    # ---- shared pieces ---------------------------------------------------------------------------------
    def need_dali(self) -> None:
        try:
            import nvidia.dali  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            raise Skip(f"nvidia.dali does not import ({type(exc).__name__}); on the device machine install "
                       f"nvidia-dali-cuda130 first") from None
        if not self.args.cpu_smoke and not torch.cuda.is_available():
            raise Skip("no CUDA device")

    def manifest(self) -> Path:
        """A manifest of the real JPEGs (two class folders), ingested once."""
        if self._manifest is None:
            from data_pipeline.ingest import ingest

            if not self.args.data or not Path(self.args.data).exists():
                raise Skip(f"no JPEGs at {self.args.data} (prepare .gpudata, see bench/gpu.sh)")
            blobs = load_jpegs(Path(self.args.data), self.args.images)
            if len(blobs) < 2 * self.args.batch:
                raise Skip(f"fewer than {2 * self.args.batch} JPEGs in {self.args.data} (prepare .gpudata)")
            for i, blob in enumerate(blobs):
                folder = self.tmp / "jpegs" / f"class{i % 2}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"im{i:04d}.jpg").write_bytes(blob)
            self._manifest = ingest(str(self.tmp / "jpegs"), self.tmp / "data", workers=0, progress=False)
        return self._manifest

    def batches(self, device: str, n: int, accum: int = 1, step: Callable | None = None, **kw) -> list[dict]:
        """n micro-batches of the DALI train loader on `device` ("cpu" / "gpu"), images moved to the CPU;
        step(batch) runs on each batch as it arrives (a training micro-step), before its pixels are kept."""
        from data_pipeline.loader import make_train_loader
        from data_pipeline.sampler import LoaderState

        a = self.args
        with make_train_loader(self.manifest(), state=LoaderState(0, 0, 0), rank=0, world_size=1,
                               global_batch=a.batch * accum, micro_batch=a.batch, image_size=a.image_size,
                               num_patches=self.num_patches, kind="dali", device=device,
                               num_threads=2, **kw) as loader:
            out = []
            for _ in range(n):
                batch = next(loader)
                seen = batch["images"].clone()  # on torch's current stream, right after the hand-off
                if step is not None:
                    step(batch)
                out.append({"sample_ids": batch["sample_ids"], "images": seen.cpu(),
                            "after": batch["images"].cpu(), "route": loader.decode_route})
            return out

    @staticmethod
    def compare(a: list[dict], b: list[dict], what: str) -> str:
        """Same samples, pixels within the decoders' tolerance; returns the worst numbers."""
        worst_abs, worst_corr = 0.0, 1.0
        for x, y in zip(a, b, strict=True):
            if not torch.equal(x["sample_ids"], y["sample_ids"]):
                raise AssertionError(f"{what}: different samples {x['sample_ids'][:4]} vs {y['sample_ids'][:4]}")
            diff = float((x["images"] - y["images"]).abs().mean())
            corr = float(np.corrcoef(x["images"].flatten(), y["images"].flatten())[0, 1])
            worst_abs, worst_corr = max(worst_abs, diff), min(worst_corr, corr)
        if worst_abs > MEAN_ABS_TOL or worst_corr < MIN_CORR:
            raise AssertionError(f"{what}: mean abs diff {worst_abs:.4f} (<= {MEAN_ABS_TOL}), corr {worst_corr:.5f} "
                                 f"(>= {MIN_CORR})")
        return f"{what}: {len(a)} batches, worst mean abs diff {worst_abs:.4f}, worst corr {worst_corr:.5f}"

    # ---- the checks --------------------------------------------------------------------------------------
    def binding(self) -> str:
        from cratescale.distributed.device import gpu_for_rank
        from cratescale.distributed.init import pick_backend

        note = "cpu-smoke: " if self.args.cpu_smoke else ""
        if torch.cuda.is_available():
            index = gpu_for_rank(int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count(), dict(os.environ))
            backend = pick_backend("auto")
            if backend != "nccl":
                raise AssertionError(f"CUDA is available but pick_backend chose {backend}")
            note += f"local rank -> cuda:{index} of {torch.cuda.device_count()}, backend nccl; "
        code = "from cratescale.distributed.init import pick_backend; print(pick_backend('auto'))"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "SLURM_GPUS_ON_NODE": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        if proc.returncode == 0 or "GpuSetupError" not in last:
            raise AssertionError(f"with CUDA hidden and GPUs asked, the start-up did not stop: rc {proc.returncode}, "
                                 f"{proc.stdout.strip() or last}")
        return note + f"CUDA hidden stops: {last.split(': ', 1)[-1][:240]}"

    def mixed(self, load: float) -> str:
        self.need_dali()
        n = self.args.n_batches
        cpu = self.batches("cpu", n)
        gpu = self.batches(self.gpu, n, hw_decoder_load=load, gpu_decode=self.safe_route())
        return self.compare(cpu, gpu, f"{self.gpu} {self.safe_route()} hw_decoder_load {load} vs cpu")

    def safe_route(self) -> str:
        """roi unless its probe failed here: run in this process, a crashing decoder would end the section."""
        return "full" if self.roi_failed else "roi"

    def routes(self) -> str:
        self.need_dali()
        if self.roi_failed:
            raise Skip(f"the crop-window decoder failed its probe ({self.roi_failed}); auto uses full here")
        n = self.args.n_batches
        roi = self.batches(self.gpu, n, gpu_decode="roi")
        full = self.batches(self.gpu, n, gpu_decode="full")
        if full[0]["route"]["decode"] != "full" or roi[0]["route"]["decode"] != "roi":
            raise AssertionError(f"gpu_decode=full gave route {full[0]['route']}")
        return self.compare(roi, full, f"{self.gpu} roi vs full+slice")

    def auto_probe(self) -> str:
        self.need_dali()
        from data_pipeline.gpu_decode import probe_crop_decode
        from data_pipeline.feed import SampleFeed

        a = self.args
        feed = SampleFeed(str(self.manifest()), mode="train", seed=0, split="train", global_batch=a.batch, rank=0,
                          world_size=1, start_step=0, num_patches=self.num_patches)
        args = dict(feed=feed, batch_size=a.batch, image_size=a.image_size, num_threads=2, device=self.gpu,
                    py_workers=1, device_id=0 if self.gpu == "gpu" else None)
        reason = self.roi_failed = probe_crop_decode(args, timeout_s=90)
        picked = "roi (crop-window decoder survived 2 batches)" if reason is None else \
            f"full (the crop-window decoder failed: {reason}; auto falls back, counted in the start record)"
        return f"{self.gpu}: auto picks {picked}"

    def grad_accum(self) -> str:
        self.need_dali()
        from cratescale.models import create_model

        a = self.args
        device = torch.device("cuda" if self.gpu == "gpu" else "cpu")
        torch.manual_seed(0)
        model = create_model(a.model, img_size=a.image_size).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        micro = {"n": 0}

        def step(batch: dict) -> None:  # one micro-step of a grad_accum 2 step, as trainer.train runs it
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, _, _ = model(batch["images"].to(device, non_blocking=True), batch["mask_noise"].to(device))
            (loss / 2).backward()
            micro["n"] += 1
            if micro["n"] % 2 == 0:
                opt.step()
                opt.zero_grad(set_to_none=True)

        n = 2 * a.n_batches
        cpu = self.batches("cpu", n, accum=2)
        gpu = self.batches(self.gpu, n, accum=2, step=step, gpu_decode=self.safe_route())
        for g in gpu:  # the batch must not change under the step that reads it
            if not torch.equal(g["images"], g["after"]):
                raise AssertionError("a batch changed while its training micro-step ran")
        return self.compare(cpu, gpu, f"{a.model} grad_accum 2 on {self.gpu} vs the cpu route")

    def extraction(self) -> str:
        try:
            import ray  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            raise Skip(f"ray does not import ({type(exc).__name__}); the device machine has no Ray") from None
        self.need_dali()
        from cratescale.checkpoint.export import export_weights
        from cratescale.config import ConfigError, load_job
        from cratescale.embeddings.extract import run_extraction
        from cratescale.models import create_model

        gpus = torch.cuda.device_count()
        per_actor = 0.0 if self.args.cpu_smoke else (1.0 if gpus >= 2 else 0.5)
        try:  # the job field (issue 15's extraction part); without it, the same number goes to extract() directly
            per_actor = load_job(str(REPO / "jobs" / "demo.yaml"),
                                 [f"extract.gpus_per_actor={per_actor}"]).extract.gpus_per_actor
            field = "extract.gpus_per_actor"
        except ConfigError:
            field = "num_gpus_per_actor (extract.gpus_per_actor absent in this build)"
        model = create_model(self.args.model, img_size=self.args.image_size)
        export = export_weights(model.state_dict(), model.config, {"step": 0, "run_name": "gpu_check"},
                                self.tmp / "export")
        _, records = run_extraction(
            export, self.manifest(), self.tmp / "store", features=["cls"], layers=[], dtype="float16",
            batch_size=self.args.batch, actors=2, image_size=self.args.image_size, loader_kind="dali",
            ray_address=None, shard_rows=2 * self.args.batch, chunk_rows=self.args.batch, split=None,
            num_cpus_per_actor=1, num_gpus_per_actor=per_actor, amp=None if self.args.cpu_smoke else "bf16",
            threads_per_actor=2)
        pids = sorted({r.get("pid") for r in records})
        devices = sorted({str(r.get("device", "not recorded")) for r in records})
        if per_actor and any(d.startswith("cpu") for d in devices):
            raise AssertionError(f"actors given {per_actor} GPU each ran on {devices}")
        # every shard is committed (run_extraction raises otherwise); Ray may give both tasks to one actor
        return (f"2 actors, {field}={per_actor} ({gpus} GPU(s)): {len(records)} shards on {len(pids)} actor "
                f"process(es), devices {devices}")


def run(args: argparse.Namespace) -> Checks:
    c = Checks(args)
    c.run("binding", c.binding)
    c.run("gpu_decode auto probe", c.auto_probe)  # first, in a child: the checks below decode in this process
    c.run("mixed decode hw_decoder_load 0", lambda: c.mixed(0.0))
    c.run("mixed decode hw_decoder_load 0.75", lambda: c.mixed(0.75))
    c.run("crop decode routes roi vs full", c.routes)
    c.run("grad_accum 2 pixels vs cpu route", c.grad_accum)
    if args.cpu_smoke and not args.extraction:
        c.rows.append({"check": "extraction 2 actors", "status": "skipped", "seconds": 0,
                       "note": "skipped: cpu-smoke (Ray actors cost ~1 min on 2 cores; --extraction runs it)"})
        c.flush()
    else:
        c.run("extraction 2 actors", c.extraction)
    print("\n" + (Path(args.out_dir) / "gpu_check.md").read_text(), flush=True)
    return c


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="CPU routes on both sides, debug model")
    p.add_argument("--data", default=None, help="folder or tar of JPEGs (.gpudata)")
    p.add_argument("--out-dir", default=os.environ.get("OUT") or str(REPO / "bench" / "results"))
    p.add_argument("--budget", type=float, default=120.0, help="seconds; checks not started by then are skipped")
    p.add_argument("--extraction", action="store_true", help="with --cpu-smoke: run the Ray extraction check too")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    args.batch, args.n_batches = (4, 2) if smoke else (32, 4)
    args.images = 16 if smoke else 256
    args.image_size = 32 if smoke else 224
    args.model = "crate_mae_debug" if smoke else "crate_mae_base"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        torch.set_num_threads(1)  # shared 2-core machine
    checks = run(args)
    return 1 if any(r["status"] == "FAIL" for r in checks.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
