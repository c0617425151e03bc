"""Learning shows in the features (issues 6 and 19), measured through the product path: `python -m
cratescale.launch` on jobs/cifar10.yaml shrunk to a tiny CRATE-MAE and 5,000 real CIFAR-10 images (500 per
class, 100 per class held out), so the launcher, local Ray, submitit's local executor, DeepSpeed ZeRO-2 over
gloo with 2 ranks, the export, the Ray extraction and the evaluate stage all run as a user's job does. The
report's own baselines are the comparison: the same architecture at its initialization (same seed) and raw
pixels, through the same probe (C searched) and kNN (k=20, T=0.07) on the same 4,000 / 1,000 split.

What a CI-sized budget shows (docs/cifar10_recipes.md, "Small-scale study"): at 250 steps of 128 the encoder
barely moves from its initialization. Same model and recipe in one process, top-1 % probe / kNN on the
final mean feature: pretrained 35.8 / 26.2, init 35.5 / 28.6, raw pixels 35.7 / 35.0 (seed 0); mask 0.5:
36.4 / 26.2. The differences to init are within the +-1.5 points that 1,000 test images resolve, and kNN
stays below raw pixels, so no margin over the baselines is asserted here (MARGINS is empty) until a recipe
at this budget shows one over repeated seeds (LEARNING_SEED=0, 1, 2 runs them). What the test asserts: the
loss falls, and the report carries the three columns and the per-layer results of both models.
"""
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from cratescale.config import dump_job, load_job

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.dist
PER_CLASS = 500
OVERRIDES = [
    "model.overrides={img_size: 32, patch_size: 4, embed_dim: 96, num_heads: 4, depth: 3, decoder_embed_dim: 96,"
    " decoder_num_heads: 4, decoder_depth: 1}",
    "data.val_per_class=100", "data.loader=pil", "optim.base_lr=1.5e-3",
    "schedule={global_batch: 128, micro_batch: 64, steps: 250, warmup_steps: 20}",
    "parallel.precision=fp32", "checkpoint.every_steps=250", "logging.every_steps=50", "logging.tensorboard=false",
    "extract.batch_size=500", "extract.actors=1", "evaluate.diagnostic_images=4"]
# {(method, baseline): points of top-1 the pretrained `mean` feature must beat that baseline by}: below the
# smallest margin seen over repeated seeds. Empty: no margin holds at this budget yet (see the docstring).
MARGINS: dict[tuple[str, str], float] = {}


def cifar_subset(source: Path, out: Path, per_class: int) -> Path:
    """The first `per_class` images of every class as an ImageFolder directory."""
    root = out / "train"
    with tarfile.open(source) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and int(Path(parts[2]).stem) < per_class:
                target = root / parts[1] / parts[2]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    return root


def test_pretraining_beats_init_and_raw_pixels_on_cifar10(tmp_path, shared_data, capsys):
    t0 = time.perf_counter()
    source = cifar_subset(shared_data / "cifar10-train.tar.gz", tmp_path / "images", PER_CLASS)
    run_dir = tmp_path / "run"
    seed = int(os.environ.get("LEARNING_SEED", "0"))  # the docstring's other rows: LEARNING_SEED=1, 2
    job = load_job(REPO / "jobs" / "cifar10.yaml",
                   [f"run_dir={run_dir}", f"data.source={source}", f"seed={seed}", *OVERRIDES])
    config = tmp_path / "learning.yaml"
    dump_job(job, config)
    result = subprocess.run([sys.executable, "-m", "cratescale.launch", str(config)], capture_output=True,
                            text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((run_dir / "report" / "pretrain" / "metrics.json").read_text())
    table = metrics["comparison"]
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("kind") == "train"]
    with capsys.disabled():
        print(f"\n[learning] CIFAR-10 {job.seed=} (4000 train / 1000 test), top-1 %:")
        for name, row in table.items():
            print(f"  {name}: pretrained {row['pretrained']:.1f}, init {row['init']:.1f}, pixels "
                  f"{row['pixels']:.1f} ({row['vs_init']:+.1f} / {row['vs_pixels']:+.1f} points)")
        print(f"  best layer {metrics['best_layer']}; loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
              f"{time.perf_counter() - t0:.0f} s")
    assert losses[-1] < 0.8 * losses[0], losses
    assert set(metrics["layers"]) == {"pretrained", "init"} and len(metrics["layers"]["init"]) == 3
    for name, row in table.items():  # all three columns, through one protocol on the same rows
        r = metrics["results"][name]
        assert row["init"] is not None and row["pixels"] is not None and r["n_test"] == 1000, (name, row)
    for (method, baseline), margin in MARGINS.items():
        row = table[f"mean/{method}"]
        assert row[f"vs_{baseline}"] > margin, (method, baseline, row)
