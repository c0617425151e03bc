"""An array's members side by side (issue 32.4, jobs/cifar10_compare.yaml): parameters, the held-out
reconstruction loss over steps, probe and kNN top-1, fine-tuned top-1 (pretrained and scratch), each against the
first member. Written by the evaluate stage of an array job to `<run_dir>/report/compare.{md,json,png}`.

Each member is read from its own run directory: export.json (the model), metrics.jsonl (`heldout` rows),
report/<set>/metrics.json (probe, kNN) and finetune/<set>/<arm>/metrics.jsonl (eval rows).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from cratescale.checkpoint.export import read_export_header
from cratescale.evaluation.finetune_report import last_rows_by_step, read_curves, summarize
from cratescale.models.registry import model_from_config


def parameter_counts(model_config: dict[str, Any]) -> dict[str, int]:
    """{"total", "encoder"}: the encoder leaves out the decoder and the mask token (what fine-tuning keeps)."""
    model = model_from_config(model_config)
    encoder = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(("decoder", "mask_token")))
    return {"total": sum(p.numel() for p in model.parameters()), "encoder": encoder}


def heldout_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, held-out reconstruction loss), the last row of a step (a resume may write it again)."""
    return [(r["step"], r["recon_loss"]) for r in last_rows_by_step(run_dir / "metrics.jsonl", "heldout")]


def member_summary(run_dir: Path, set_name: str = "pretrain") -> dict[str, Any]:
    """What the comparison shows of one member (absent parts are None: a member not yet evaluated)."""
    header = read_export_header(run_dir / "export")
    config = header["model_config"]
    report = run_dir / "report" / set_name / "metrics.json"
    results = json.loads(report.read_text())["results"] if report.is_file() else {}
    curve = heldout_curve(run_dir)
    return {"run_dir": str(run_dir), "model": config["name"], "width": config.get("embed_dim"),
            "depth": config.get("depth"), "params": parameter_counts(config), "heldout": curve,
            "top1": {name: r["top1"] for name, r in results.items()},
            "finetune": summarize(read_curves(run_dir / "finetune", set_name)) or None}


def _ratio(value: float | None, first: float | None) -> str:
    return "-" if value is None or not first else f"{value / first:.2f}x"


def compare_table(members: Sequence[dict[str, Any]]) -> str:
    """The markdown table: one row per member, ratios and differences against member 0."""
    first = members[0]
    methods = sorted({name for m in members for name in m["top1"]})
    head = ["member", "model", "encoder params", "vs 0", "held-out recon loss (step)", "vs 0",
            *[f"{name} (%)" for name in methods], "fine-tuned (%)", "scratch (%)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    first_loss = first["heldout"][-1][1] if first["heldout"] else None
    for i, m in enumerate(members):
        last = m["heldout"][-1] if m["heldout"] else None
        ft = m["finetune"] or {}
        cells = [str(i), f"{m['model']} ({m['width']} wide, {m['depth']} deep)", f"{m['params']['encoder']:,}",
                 _ratio(m["params"]["encoder"], first["params"]["encoder"]),
                 "-" if last is None else f"{last[1]:.4f} ({last[0]})", _ratio(last and last[1], first_loss),
                 *[f"{100 * m['top1'][name]:.2f}" if name in m["top1"] else "-" for name in methods],
                 *[f"{100 * ft[arm]['top1']:.2f}" if arm in ft else "-" for arm in ("pretrained", "scratch")]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_compare(members_dirs: Sequence[Path], out_dir: Path, set_name: str = "pretrain") -> dict[str, Path]:
    """compare.md, compare.json and (with held-out curves) compare.png in `out_dir`."""
    from cratescale.evaluation import plots

    members = [member_summary(Path(d), set_name) for d in members_dirs]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"compare.json": out_dir / "compare.json", "compare.md": out_dir / "compare.md"}
    written["compare.json"].write_text(json.dumps(members, indent=1))
    written["compare.md"].write_text(f"# The array's members side by side ({set_name})\n\n" + compare_table(members))
    curves = {f"{i}: {m['model']} {m['width']}": m["heldout"] for i, m in enumerate(members) if m["heldout"]}
    if curves:
        written["compare.png"] = plots.plot_heldout_curves(curves, out_dir / "compare.png")
    return written
