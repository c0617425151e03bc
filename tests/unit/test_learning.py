"""Learning shows in the features (issues 6 and 19), measured through the product path: `python -m
cratescale.launch` on jobs/cifar10.yaml shrunk to a tiny CRATE-MAE and 5,000 real CIFAR-10 images (500 per
class, 100 per class held out), so the launcher, local Ray, submitit's local executor, DeepSpeed ZeRO-2 over
gloo with 2 ranks, the export, the Ray extraction and the evaluate stage all run as a user's job does. The
report's own baselines are the comparison: the same architecture at its initialization (same seed) and raw
pixels, through the same probe (C searched) and kNN (k=20, T=0.07) on the same 4,000 / 1,000 split.

The recipe (mask 0.5, 600 steps of 128 in the reference layout; docs/cifar10_recipes.md "Learning test") and
the margins come from its own runs through this test, LEARNING_SEED=0, 1, 2 (2026-12-02, quiet machine, 199-220 s
each), top-1 points of pretrained over the baseline:

| statistic | seed 0 | seed 1 | seed 2 | asserted |
|---|---|---|---|---|
| probe, per-layer gain over init (mean over the 3 blocks) | +2.7 | +3.0 | +3.0 | > 2.0 |
| kNN, per-layer gain over init (mean over the 3 blocks) | +1.6 | +4.3 | +3.3 | > 1.0 |
| probe, `mean` feature over raw pixels | +2.9 | +3.1 | +4.4 | > 2.0 |
| probe, `mean` feature over init | +1.7 | +0.4 | +4.0 | not asserted |
| kNN, `mean` feature over init / raw pixels | +0.1 / -6.0 | +0.8 / -8.7 | +4.0 / -6.1 | not asserted |

The per-layer gain averages three paired comparisons on the same 1,000 images, which is why it holds where the
final feature alone (spread 3.6 points over the seeds) does not. kNN stays 6-9 points below raw pixels at this
budget, as it does at the full recipe's (docs/cifar10_recipes.md); "beats raw pixels" is asserted for the probe
only, and the random CRATE encoder's probe already matches the pixels', so the init margin is the evidence of
learning.

The fine-tune stage runs too (both arms, 200 steps of 128 here). At the shipped length (500 steps of 256, the
2026-12-07 suite beside two busy loops, seed 0) the pretrained arm led at each of its five evals and ended at
45.0% against the scratch arm's 41.5% (+3.5 points, 1,000 images each: inside the noise, so not asserted); the
test asserts that both arms train, evaluate and reach the report (each above 25%; chance is 10%).
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
    " decoder_num_heads: 4, decoder_depth: 1, mask_ratio: 0.5}",
    "data.val_per_class=100", "data.loader=pil", "optim.base_lr=1.5e-3",
    "schedule={global_batch: 128, micro_batch: 64, steps: 600, warmup_steps: 20}",
    "parallel.precision=fp32", "checkpoint.every_steps=600", "logging.every_steps=50", "logging.tensorboard=false",
    "extract.batch_size=500", "extract.actors=1", "evaluate.diagnostic_images=4",
    # the shipped job's fine-tune stage, shortened: both arms, their eval rows and the report's rows
    "finetune.steps=200", "finetune.global_batch=128", "finetune.micro_batch=64", "finetune.eval_every_steps=100"]
# {(statistic, baseline): top-1 points pretrained must beat the baseline by}, below the smallest of the
# docstring's seeds. "layers/<method>": the gain over init averaged over the encoder blocks.
MARGINS: dict[tuple[str, str], float] = {("layers/linear_probe", "init"): 2.0, ("layers/knn", "init"): 1.0,
                                         ("mean/linear_probe", "pixels"): 2.0}


def layer_gain(layers: dict, method: str) -> float:
    """Points of top-1 the pretrained model's blocks beat the same blocks at init by, on average."""
    pretrained, init = layers["pretrained"], layers["init"]
    return 100 * sum(pretrained[b][method]["top1"] - init[b][method]["top1"] for b in init) / len(init)


def margin(metrics: dict, statistic: str, baseline: str) -> float:
    kind, method = statistic.split("/")
    if kind == "layers":
        assert baseline == "init", statistic
        return layer_gain(metrics["layers"], method)
    return metrics["comparison"][statistic][f"vs_{baseline}"]


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
    # A bound for a hang, not a speed claim: 140 s on the quiet 2 cores, past 900 s beside two busy loops (the
    # two ranks get half the CPU; 600 steps at 1.6 s each), where 900 s failed the suite on unchanged code.
    result = subprocess.run([sys.executable, "-m", "cratescale.launch", str(config)], capture_output=True,
                            text=True, timeout=3600, cwd=tmp_path)
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
        for method in ("linear_probe", "knn"):
            print(f"  layers/{method}: {layer_gain(metrics['layers'], method):+.1f} points over init per block")
        print(f"  best layer {metrics['best_layer']}; loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
              f"{time.perf_counter() - t0:.0f} s")
    assert losses[-1] < 0.8 * losses[0], losses
    assert set(metrics["layers"]) == {"pretrained", "init"} and len(metrics["layers"]["init"]) == 3
    for name, row in table.items():  # all three columns, through one protocol on the same rows
        r = metrics["results"][name]
        assert row["init"] is not None and row["pixels"] is not None and r["n_test"] == 1000, (name, row)
    finetuned = metrics["finetune"]["summary"]
    with capsys.disabled():
        diff = finetuned["difference"]
        print(f"  fine-tuned 200 steps: pretrained {100 * finetuned['pretrained']['top1']:.1f}, scratch "
              f"{100 * finetuned['scratch']['top1']:.1f} ({diff['points']:+.1f} points, 95% "
              f"[{diff['ci95_points'][0]:+.1f}, {diff['ci95_points'][1]:+.1f}])")
    for arm in ("pretrained", "scratch"):
        assert (finetuned[arm]["step"], finetuned[arm]["n"]) == (200, 1000) and finetuned[arm]["top1"] > 0.25, \
            finetuned
    assert [r["step"] for r in metrics["finetune"]["curves"]["pretrained"]] == [100, 200]
    for (statistic, baseline), points in MARGINS.items():
        assert margin(metrics, statistic, baseline) > points, (statistic, baseline, metrics["layers"], table)
