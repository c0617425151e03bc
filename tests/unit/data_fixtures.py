"""Builders of small real datasets for the data_pipeline tests (from /work/shared/data)."""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(os.environ.get("CRATESCALE_DATA", "/work/shared/data"))
IMAGENET_TAR = DATA / "imagenet-sample.tar"
CIFAR_TGZ = DATA / "cifar10-train.tar.gz"
GREYSCALE = ["imagenet-sample/n02096051/n02096051_Airedale.JPEG",
             "imagenet-sample/n02676566/n02676566_acoustic_guitar.JPEG"]


def imagenet_members(n: int, with_greyscale: bool = True) -> list[tuple[str, bytes]]:
    """The first n ImageNet sample photos (tar order) plus two greyscale ones: (name, bytes)."""
    out = []
    with tarfile.open(IMAGENET_TAR) as tf:
        for m in tf:
            if m.isfile() and (len(out) < n or (with_greyscale and m.name in GREYSCALE)):
                out.append((m.name, tf.extractfile(m).read()))
    return out


def imagenet_folder(dest: Path, n: int = 50) -> Path:
    """ImageFolder tree dest/<synset>/<file>.JPEG with n (+2 greyscale) real photos."""
    for name, data in imagenet_members(n):
        p = dest / Path(name).relative_to("imagenet-sample")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return dest


def jpeg_bytes(size=(40, 30), colour=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_bytes(size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buf, format="PNG")
    return buf.getvalue()


def bomb_jpeg() -> bytes:
    """A tiny JPEG whose SOF header claims 60000 x 60000 pixels (a decompression bomb)."""
    data = bytearray(jpeg_bytes((16, 16)))
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big")
    return bytes(data)


def bad_files(good_jpeg: bytes) -> dict[str, bytes]:
    """Files that must be rejected, by name, and why."""
    rng = np.random.default_rng(0)
    return {"zero.jpg": b"",
            "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
            "random.jpg": rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(),
            "png_named.jpg": png_bytes(),
            "notes.txt": b"this is not an image\n",
            "bomb.jpg": bomb_jpeg()}


def add_tar_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def build_tar_of_tars(members: list[tuple[str, bytes]], out: Path) -> Path:
    """Outer tar of per-synset inner tars nXXXX.tar, like ImageNet-21k's fall11_whole.tar."""
    by_class: dict[str, list[tuple[str, bytes]]] = {}
    for name, data in members:
        by_class.setdefault(Path(name).parent.name, []).append((Path(name).name, data))
    with tarfile.open(out, "w") as outer:
        for cls in sorted(by_class):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for fname, data in by_class[cls]:
                    add_tar_member(inner, fname, data)
            add_tar_member(outer, f"{cls}.tar", buf.getvalue())
    return out


def build_wds_shards(members: list[tuple[str, bytes]], out_dir: Path, per_shard: int) -> list[Path]:
    """Webdataset shards: key.jpg + key.cls (the class index of the sorted synsets)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = sorted({Path(n).parent.name for n, _ in members})
    shards = []
    for s in range(0, len(members), per_shard):
        path = out_dir / f"shard-{s // per_shard:04d}.tar"
        with tarfile.open(path, "w") as tf:
            for i, (name, data) in enumerate(members[s:s + per_shard], start=s):
                add_tar_member(tf, f"{i:06d}.jpg", data)
                add_tar_member(tf, f"{i:06d}.cls", str(classes.index(Path(name).parent.name)).encode())
        shards.append(path)
    return shards


def cifar_subset_tgz(out: Path, per_class: int = 6) -> tuple[Path, dict[str, bytes]]:
    """A .tar.gz of per_class CIFAR images per class (train/<class>/<n>.jpg) plus unsafe members."""
    taken: dict[str, bytes] = {}
    counts: dict[str, int] = {}
    with tarfile.open(CIFAR_TGZ, "r|gz") as src:
        for m in src:
            if not m.isfile():
                continue
            cls = Path(m.name).parent.name
            if counts.get(cls, 0) < per_class:
                counts[cls] = counts.get(cls, 0) + 1
                taken[m.name] = src.extractfile(m).read()
            if len(counts) == 10 and all(c >= per_class for c in counts.values()):
                break
    with tarfile.open(out, "w:gz") as tf:
        for name, data in taken.items():
            add_tar_member(tf, name, data)
        add_tar_member(tf, "../evil/escape.jpg", jpeg_bytes())
        add_tar_member(tf, "train/cat/picture.png.jpg", png_bytes())
        link = tarfile.TarInfo("train/cat/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    return out, taken
