"""The fine-tune rows of the report: each transfer set's pretrained and scratch arms (launch/finetune_stage.py),
their final held-out top-1 with 95% intervals, the difference in points, and the curves (top-1 vs step).

The arms' runs write `{"kind": "eval", "step", "arm", "set", "top1", "n"}` rows into their metrics.jsonl
(engine/finetune_task.py); a resumed run may write a step's row again, and the last one written counts.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from cratescale.evaluation.protocol import wilson

ARMS = ("pretrained", "scratch")


def last_rows_by_step(metrics_path: Path, kind: str) -> list[dict[str, Any]]:
    """The rows of `kind` in a metrics.jsonl, one per step (the last written: a resume may write a step again), by
    step; [] when there is none. (engine.metrics.read_metrics reads the same file; evaluation may not import
    engine, docs/imports.md.)"""
    by_step: dict[int, dict[str, Any]] = {}
    try:
        lines = metrics_path.read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line cut by a kill mid-write: the rows before it stand
            continue
        if isinstance(row, dict) and row.get("kind") == kind and isinstance(row.get("step"), int):
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def read_curves(finetune_dir: Path, set_name: str) -> dict[str, list[dict[str, Any]]]:
    """{arm: eval rows} of set `set_name` under a run's `finetune/` folder (arms without rows left out)."""
    curves = {arm: last_rows_by_step(finetune_dir / set_name / arm / "metrics.jsonl", "eval") for arm in ARMS}
    return {arm: rows for arm, rows in curves.items() if rows}


def difference_ci95(a: tuple[int, int], b: tuple[int, int]) -> tuple[float, float]:
    """95% interval of p_a - p_b (fractions) from two (correct, n) counts: Newcombe's hybrid score interval built
    on the Wilson intervals. It treats the two accuracies as independent; both arms are scored on the same
    images, so it is wider than a paired interval would be (conservative)."""
    (ca, na), (cb, nb) = a, b
    pa, pb = ca / na, cb / nb
    la, ua = wilson(ca, na)
    lb, ub = wilson(cb, nb)
    d = pa - pb
    return d - math.sqrt((pa - la) ** 2 + (ub - pb) ** 2), d + math.sqrt((ua - pa) ** 2 + (pb - lb) ** 2)


def summarize(curves: Mapping[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """{arm: {"step", "top1", "n", "top1_ci95"}} at each arm's last eval, and "difference" (points, pretrained
    minus scratch, with its 95% interval in points) when both arms have one."""
    out: dict[str, Any] = {}
    counts = {}
    for arm, rows in curves.items():
        last = rows[-1]
        correct, n = round(last["top1"] * last["n"]), int(last["n"])
        counts[arm] = (correct, n)
        out[arm] = {"step": last["step"], "top1": last["top1"], "n": n, "top1_ci95": list(wilson(correct, n))}
    if all(arm in counts and counts[arm][1] > 0 for arm in ARMS):
        low, high = difference_ci95(counts["pretrained"], counts["scratch"])
        out["difference"] = {"points": 100 * (out["pretrained"]["top1"] - out["scratch"]["top1"]),
                             "ci95_points": [100 * low, 100 * high],
                             "equal_steps": out["pretrained"]["step"] == out["scratch"]["step"]}
    return out


def finetune_table(summary: Mapping[str, Any]) -> str:
    """| arm | step | top-1 (%) [95%] | n | and the difference line."""
    lines = ["| arm | step | top-1 (%) | val images |", "|---|---|---|---|"]
    for arm in ARMS:
        if arm in summary:
            r = summary[arm]
            low, high = r["top1_ci95"]
            lines.append(f"| {arm} | {r['step']} | {100 * r['top1']:.2f} [{100 * low:.1f}, {100 * high:.1f}] | "
                         f"{r['n']} |")
    text = "\n".join(lines) + "\n"
    if diff := summary.get("difference"):
        low, high = diff["ci95_points"]
        steps = "" if diff["equal_steps"] else " (the arms stopped at different steps)"
        text += (f"\nPretrained minus scratch: {diff['points']:+.2f} points, 95% interval [{low:+.1f}, {high:+.1f}] "
                 f"(Newcombe, unpaired: conservative){steps}\n")
    return text
