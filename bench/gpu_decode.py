"""JPEG decode rows of bench/gpu_bench.py: nvJPEG (torchvision) as the stand-in for DALI's mixed decoder,
against one CPU thread; and the preparation of the carried sample data."""
from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path
from typing import Callable

import torch

from bench.gpu_harness import Bench, sync

JPEG_SUFFIXES = (".jpg", ".jpeg")


def load_jpegs(path: Path, limit: int) -> list[bytes]:
    """JPEG bytes from a tar file or a folder (recursive; tar files inside it are read too), sorted by name."""
    if not path.is_dir():
        return _tar_jpegs(path, limit)
    out: list[bytes] = []
    for f in sorted(path.rglob("*")):
        if len(out) >= limit:
            break
        if f.suffix.lower() in JPEG_SUFFIXES:
            out.append(f.read_bytes())
        elif f.suffix == ".tar":
            out.extend(_tar_jpegs(f, limit - len(out)))
    return out


def _tar_jpegs(path: Path, limit: int) -> list[bytes]:
    out: list[bytes] = []
    with tarfile.open(path) as tar:
        for m in tar:
            if len(out) >= limit:
                break
            if m.isfile() and Path(m.name).suffix.lower() in JPEG_SUFFIXES:
                out.append(tar.extractfile(m).read())
    return out


def _cpu_decoder():
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        return "torchvision", lambda data: decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                                       mode=ImageReadMode.RGB)
    except Exception:  # noqa: BLE001 - torchvision is absent from the CPU venv
        import numpy as np
        from PIL import Image

        return "PIL", lambda data: np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _rate(fn: Callable[[], int], seconds: float, device: torch.device) -> float:
    """Items per second of repeated fn() calls (each returns how many items it did), at least one call."""
    sync(device)
    t0, n, calls = time.perf_counter(), 0, 0
    while calls == 0 or time.perf_counter() - t0 < seconds:
        n += fn()
        calls += 1
    sync(device)
    return n / (time.perf_counter() - t0)


def section_decode(b: Bench) -> None:
    data_path = Path(b.args.data) if b.args.data else None
    if data_path is None or not data_path.exists():
        b.add("decode", "JPEG decode", note=f"skipped: no JPEG folder/tar at {data_path} (see bench/gpu.sh header)")
        return
    blobs = load_jpegs(data_path, b.args.max_images)
    if not blobs:
        b.add("decode", "JPEG decode", note=f"skipped: no *.jpg/*.jpeg in {data_path}")
        return
    cpu_name, cpu_decode = _cpu_decoder()
    ok, pixels = [], 0
    for blob in blobs:  # drop what the CPU decoder refuses (CMYK, PNG named .JPEG), count it
        try:
            img = cpu_decode(blob)
            pixels += img.shape[0] * img.shape[1] if cpu_name == "PIL" else img.shape[1] * img.shape[2]
            ok.append(blob)
        except Exception:  # noqa: BLE001
            pass
    mb = sum(map(len, ok)) / len(ok) / 1e6
    desc = f"{len(ok)} of {len(blobs)} decodable, mean {pixels / len(ok) / 1e6:.2f} MP, {mb * 1e3:.0f} KB"
    sub = ok[: max(8, len(ok) // 4)]
    base = _rate(lambda: sum(1 for _ in map(cpu_decode, sub)), b.args.decode_seconds / 2, torch.device("cpu"))
    b.add("decode", f"CPU decode, 1 thread ({cpu_name})", measured=base, unit="img/s", note=desc)
    if b.device.type != "cuda":
        b.add("decode", "GPU nvJPEG batched", note="skipped: cpu-smoke (no GPU); CPU path above ran")
        return
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(x), dtype=torch.uint8) for x in ok]
    mode, first_error = ImageReadMode.RGB, None
    try:
        decode_jpeg(tensors[0], device="cuda", mode=mode)
    except Exception:  # noqa: BLE001 - an older nvJPEG path without RGB conversion: decode as stored
        mode = ImageReadMode.UNCHANGED
    gpu_ok = []
    for t in tensors:  # per-image pass: warms nvJPEG up and drops what it refuses
        try:
            decode_jpeg(t, device="cuda", mode=mode)
            gpu_ok.append(t)
        except Exception as exc:  # noqa: BLE001
            first_error = first_error or exc
    if not gpu_ok:
        raise RuntimeError(f"nvJPEG decoded none of {len(tensors)} images; first error: {first_error}")
    bs = b.args.decode_batch
    batches = [gpu_ok[i:i + bs] for i in range(0, len(gpu_ok), bs)]

    def run_all() -> int:
        for chunk in batches:
            decode_jpeg(chunk, device="cuda", mode=mode)
        return len(gpu_ok)

    run_all()
    rate = _rate(run_all, b.args.decode_seconds, b.device)
    b.add("decode", f"GPU nvJPEG decode_jpeg(device=cuda), batch {bs}", measured=rate, unit="img/s",
          baseline=f"{base:,.0f} (1 CPU thread)", ratio=rate / base,
          note=f"{len(gpu_ok)} images, mode {mode.name}; stand-in for DALI 'mixed' decode (no crop/resize)")


def prepare_data(src: Path, dest: Path, n: int) -> None:
    """Copy the first n JPEGs of a tar/folder into one small tar (what travels in .gpudata/)."""
    blobs = load_jpegs(src, n)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w") as tar:
        for i, blob in enumerate(blobs):
            info = tarfile.TarInfo(f"img_{i:05d}.jpg")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    print(f"wrote {len(blobs)} JPEGs, {dest.stat().st_size / 1e6:.1f} MB, to {dest}")
