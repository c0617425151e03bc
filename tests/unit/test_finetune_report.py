"""The report's fine-tune rows (issue 32.3): the arms' eval rows as metrics.jsonl holds them after a resume and a
kill, the difference's 95% interval against a published example, the table, the figure and metrics.json."""
import json
from pathlib import Path

import pytest

from cratescale.evaluation.finetune_report import difference_ci95, read_curves, summarize
from cratescale.evaluation.report import write_report


def _write(arm_dir: Path, rows: list, tail: str = "") -> None:
    arm_dir.mkdir(parents=True)
    (arm_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def _eval(step: int, top1: float, arm: str, n: int = 200) -> dict:
    return {"kind": "eval", "step": step, "arm": arm, "set": "cifar10", "top1": top1, "n": n}


def test_curves_take_the_last_row_of_a_step_and_survive_a_cut_line(tmp_path):
    arm = tmp_path / "cifar10" / "pretrained"
    rows = [{"kind": "train", "step": 10, "loss": 2.0}, _eval(10, 0.30, "pretrained"), _eval(20, 0.40, "pretrained"),
            _eval(20, 0.45, "pretrained"),  # the step evaluated again after a resume: this one counts
            _eval(30, 0.50, "pretrained")]
    _write(arm, rows, tail='{"kind": "eval", "step": 40, "to')  # a kill mid-write
    curves = read_curves(tmp_path, "cifar10")
    assert list(curves) == ["pretrained"]  # no scratch run: left out, not an empty curve
    assert [(r["step"], r["top1"]) for r in curves["pretrained"]] == [(10, 0.30), (20, 0.45), (30, 0.50)]
    assert read_curves(tmp_path, "other") == {}


def test_the_difference_interval_matches_newcombes_worked_example():
    # Newcombe (1998), Statistics in Medicine 17:873, Table II example (a): 56/70 vs 48/80, method 10
    low, high = difference_ci95((56, 70), (48, 80))
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)
    low, high = difference_ci95((40, 80), (40, 80))  # equal accuracies: symmetric about 0
    assert low == pytest.approx(-high) and low < 0


def test_report_shows_both_arms_the_difference_and_the_curves(tmp_path):
    runs = tmp_path / "finetune"
    for arm, finals in (("pretrained", [0.5, 0.7, 0.8]), ("scratch", [0.3, 0.4, 0.5])):
        _write(runs / "cifar10" / arm, [_eval(100 * (i + 1), v, arm) for i, v in enumerate(finals)])
    curves = read_curves(runs, "cifar10")
    written = write_report(tmp_path / "report", finetune=curves, context={"run": "r", "set": "cifar10"})
    assert written["finetune.png"].stat().st_size > 0
    table = written["results.md"].read_text()
    assert "| pretrained | 300 | 80.00 [" in table and "| scratch | 300 | 50.00 [" in table
    assert "Pretrained minus scratch: +30.00 points" in table
    summary = json.loads(written["metrics.json"].read_text())["finetune"]["summary"]
    low, high = difference_ci95((160, 200), (100, 200))
    assert summary["difference"]["ci95_points"] == pytest.approx([100 * low, 100 * high])
    assert summary["difference"]["equal_steps"] and summary["scratch"]["n"] == 200
    assert summarize({"scratch": curves["scratch"]}).get("difference") is None  # one arm: no difference
