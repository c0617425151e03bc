"""An array's members side by side (issue 32.4): parameters from each member's export, the held-out
reconstruction loss (the last row of a step), probe/kNN from its report, fine-tune top-1 from its arms' rows,
each against member 0; the markdown, the JSON and the figure."""
import json
from pathlib import Path

import torch

from cratescale.checkpoint.export import export_weights
from cratescale.evaluation.compare_report import parameter_counts, write_compare
from cratescale.models import create_model

SHAPE = dict(img_size=32, patch_size=4, depth=4, num_heads=4, decoder_embed_dim=64, decoder_depth=1,
             decoder_num_heads=4)


def _member(root: Path, name: str, width: int, heldout: list, top1: dict | None, finetune: dict | None) -> Path:
    torch.manual_seed(0)
    model = create_model(name, embed_dim=width, **SHAPE)
    export_weights(model.state_dict(), model.config, {"step": 600}, root / "export")
    rows = [{"kind": "train", "step": 100, "loss": 1.0}, *({"kind": "heldout", "step": s, "recon_loss": v, "n": 50}
                                                           for s, v in heldout)]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if top1:
        (root / "report" / "pretrain").mkdir(parents=True)
        (root / "report" / "pretrain" / "metrics.json").write_text(
            json.dumps({"results": {k: {"top1": v} for k, v in top1.items()}}))
    for arm, value in (finetune or {}).items():
        (root / "finetune" / "pretrain" / arm).mkdir(parents=True)
        (root / "finetune" / "pretrain" / arm / "metrics.jsonl").write_text(json.dumps(
            {"kind": "eval", "step": 500, "arm": arm, "set": "pretrain", "top1": value, "n": 1000}) + "\n")
    return root


def test_members_side_by_side_against_the_first(tmp_path):
    crate = _member(tmp_path / "a0", "crate_mae_debug", 64, [(100, 0.9), (200, 0.5), (200, 0.4)],
                    {"mean/linear_probe": 0.5, "mean/knn": 0.4}, {"pretrained": 0.6, "scratch": 0.5})
    vit = _member(tmp_path / "a1", "vit_mae_debug", 64, [(100, 0.8), (200, 0.5)],
                  {"mean/linear_probe": 0.55, "mean/knn": 0.45}, {"pretrained": 0.65, "scratch": 0.5})
    unfinished = _member(tmp_path / "a2", "vit_mae_debug", 32, [], None, None)
    written = write_compare([crate, vit, unfinished], tmp_path / "report")
    table = written["compare.md"].read_text().splitlines()
    counts = [parameter_counts(json.loads((d / "export" / "export.json").read_text())["model_config"])
              for d in (crate, vit)]
    assert counts[0]["encoder"] < counts[1]["encoder"] < counts[1]["total"]
    assert table[4].startswith(f"| 0 | crate_mae_debug (64 wide, 4 deep) | {counts[0]['encoder']:,} | 1.00x | "
                               f"0.4000 (200) | 1.00x | 40.00 | 50.00 | 60.00 | 50.00 |")  # the last row of step 200
    ratio = counts[1]["encoder"] / counts[0]["encoder"]
    assert table[5] == (f"| 1 | vit_mae_debug (64 wide, 4 deep) | {counts[1]['encoder']:,} | {ratio:.2f}x | "
                        f"0.5000 (200) | 1.25x | 45.00 | 55.00 | 65.00 | 50.00 |")
    assert table[6].endswith("| - | - | - | - | - | - |")  # not evaluated yet: shown as missing, not as zero
    saved = json.loads(written["compare.json"].read_text())
    assert saved[0]["heldout"] == [[100, 0.9], [200, 0.4]] and saved[2]["finetune"] is None
    assert written["compare.png"].stat().st_size > 0
