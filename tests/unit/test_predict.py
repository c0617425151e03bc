"""`python -m cratescale.evaluation predict EXPORT FOLDER [--json]` (issue 32) on real CIFAR-10 JPEGs: a classifier
fine-tuned here for 200 steps on 3 classes x 40 images, exported, then predicted through the product path (ingest
to a manifest, the eval loader, class folders matched to the export's names) on those images and on 3 x 40 held-out
ones. Each top-1 must equal the one computed here directly from the same model and JPEGs (decoded by PIL with the
eval view's window), and be above chance (1/3): by a wide margin on the fitted images (1.0 when written), by some
on the held-out ones (0.66 when written, on 120 images). The export knows 4 classes in another order than the
folder's, so a match by position instead of name would fail."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cratescale.checkpoint.classifier_export import export_classifier, load_classifier
from cratescale.checkpoint.export import export_weights
from cratescale.engine.finetune_recipe import finetune_loss, param_groups_lrd, set_lr
from cratescale.evaluation.__main__ import main
from cratescale.models import create_model, scratch_classifier
from data_pipeline.augment import center_window
from data_pipeline.pil_loader import decode_window, normalize

REPO = Path(__file__).resolve().parents[2]
FOLDER_CLASSES = ("airplane", "automobile", "bird")  # the tar's first three: a short read
EXPORT_CLASSES = ["bird", "cat", "airplane", "automobile"]  # another order, and one class the folder lacks
PER_CLASS = 40


def cifar_folder(tgz: Path, out: Path, first: int, stop: int) -> Path:
    """Images first..stop-1 of each of FOLDER_CLASSES as class folders."""
    with tarfile.open(tgz) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if len(parts) == 3 and parts[1] not in FOLDER_CLASSES:
                break  # class folders come one after another
            if member.isfile() and len(parts) == 3 and first <= int(Path(parts[2]).stem) < stop:
                target = out / parts[1] / parts[2]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    return out


def eval_pixels(folder: Path, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image as the eval loader views it (short side resized to size*256/224, centre crop), with its
    class's index among EXPORT_CLASSES: PIL and the window alone, no manifest or loader."""
    images, labels = [], []
    for path in sorted(folder.glob("*/*.jpg")):
        w, h = Image.open(path).size
        anchor, shape = center_window(np.array([w]), np.array([h]))
        images.append(decode_window(path.read_bytes(), anchor[0], shape[0], 0, size))
        labels.append(EXPORT_CLASSES.index(path.parent.name))
    return normalize(torch.from_numpy(np.stack(images))), torch.tensor(labels)


def fine_tune(images: torch.Tensor, labels: torch.Tensor, steps: int = 200) -> torch.nn.Module:
    model = scratch_classifier(create_model("crate_mae_debug").config, len(EXPORT_CLASSES), EXPORT_CLASSES,
                               drop_path=0.1, seed=0)
    optimizer = torch.optim.AdamW(param_groups_lrd(model, weight_decay=0.05, layer_decay=0.75))
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    for step in range(steps):
        set_lr(optimizer, 2e-3 * min(1.0, (step + 1) / 20))
        pick = torch.randint(0, len(images), (32,), generator=g)
        loss = finetune_loss(model(images[pick]), labels[pick], label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_predict_top1_on_a_cifar10_folder(tmp_path, shared_data, capsys):
    tgz = shared_data / "cifar10-train.tar.gz"
    fitted = cifar_folder(tgz, tmp_path / "fitted", 0, PER_CLASS)
    held_out = cifar_folder(tgz, tmp_path / "held_out", PER_CLASS, 2 * PER_CLASS)
    images, labels = eval_pixels(fitted)
    assert len(images) == 3 * PER_CLASS
    export = export_classifier(fine_tune(images, labels), {"run": "test", "step": 200}, tmp_path / "ft")
    model, _ = load_classifier(export)

    def direct(folder: Path) -> float:
        x, y = eval_pixels(folder)
        with torch.no_grad():
            return int((model(x).argmax(dim=-1) == y).sum()) / len(y)

    result = subprocess.run([sys.executable, "-m", "cratescale.evaluation", "predict", str(export), str(fitted),
                             "--json", "--loader", "pil"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    assert out == {"top1": pytest.approx(direct(fitted), abs=1e-12), "n": 3 * PER_CLASS}
    assert out["top1"] > 0.8
    assert main(["predict", str(export), str(held_out), "--json", "--loader", "pil"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"top1": pytest.approx(direct(held_out), abs=1e-12), "n": 3 * PER_CLASS}
    assert out["top1"] > 0.45


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    clf = scratch_classifier(create_model("crate_mae_debug").config, 2, ["bird", "cat"], seed=0)
    export = export_classifier(clf, {"step": 0}, tmp_path / "ft")
    mae = create_model("crate_mae_debug")
    mae_export = export_weights(mae.state_dict(), mae.config, {"step": 0}, tmp_path / "mae")
    folder = tmp_path / "images"
    (folder / "ship").mkdir(parents=True)
    (folder / "bird").mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "ship" / "a.jpg")
    Image.new("RGB", (40, 30), (20, 30, 200)).save(folder / "bird" / "b.jpg")
    (tmp_path / "empty").mkdir()
    cases = [([str(tmp_path / "nope"), str(folder)], "not found"),
             ([str(export), str(tmp_path / "nowhere")], "is not a folder"),
             ([str(mae_export), str(folder)], "not a fine-tuned classifier"),
             ([str(export), str(folder)], "'ship' not among the export's 2 classes"),
             ([str(export), str(tmp_path / "empty")], "no decodable images")]
    for args, expect in cases:
        assert main(["predict", *args, "--loader", "pil"]) == 2, args
        err = capsys.readouterr().err
        assert expect in err and err.count("\n") == 1, (args, err)
    (folder / "ship" / "a.jpg").unlink()
    (folder / "ship").rmdir()
    assert main(["predict", str(export), str(folder), "--loader", "pil", "--work-dir", str(tmp_path / "work")]) == 0
    assert "of 1 images" in capsys.readouterr().out and (tmp_path / "work" / "manifest.parquet").exists()
