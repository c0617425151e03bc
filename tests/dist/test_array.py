"""Job arrays (issue 5): `cluster.array` turns one job file into N runs trained concurrently, each with its own
overrides, run directory and export; the data is ingested once."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.dist


def test_array_of_mask_ratios_trains_each_member(tmp_path, tiny_manifest):
    run_dir = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "cratescale.launch", str(REPO / "tests/dist/tiny.yaml"), f"run_dir={run_dir}",
         f"data.root={tiny_manifest.parent}", "stages=[pretrain,export]", "schedule.steps=6",
         "cluster.array=[{model.overrides.mask_ratio: 0.5}, {model.overrides.mask_ratio: 0.9}]"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for i, ratio in enumerate((0.5, 0.9)):
        member = run_dir / f"array-{i:03d}"
        config = yaml.safe_load((member / "config.yaml").read_text())
        assert config["name"] == f"tiny-{i}" and config["model"]["overrides"]["mask_ratio"] == ratio
        rows = [json.loads(line) for line in (member / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1] == {**rows[-1], "kind": "end", "step": 6, "status": "completed"}
        export = json.loads((member / "export" / "export.json").read_text())
        assert export["model_config"]["mask_ratio"] == ratio
    assert not (run_dir / "checkpoints").exists(), "the parent run trains nothing itself"
    console = " ".join(result.stdout.split())  # the member-by-member stages say which member each line is about
    for i in (0, 1):
        assert f"export: array member tiny-{i} ({run_dir / f'array-{i:03d}'})" in console, console[-3000:]
