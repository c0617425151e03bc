"""The 2-rank benchmarks (bench/scaling_check.py, bench/engine_overhead.py) on real DeepSpeed ZeRO-2 over gloo. Only
what does not depend on timing is asserted: the traffic the model assumes is the traffic DeepSpeed sends."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from bench import scaling_check

REPO = Path(__file__).resolve().parents[2]


def test_zero2_all_reduces_the_parameter_count_per_step(capsys):
    result = scaling_check.check_cpu(steps=2, repeats=1)
    # one bucketed all-reduce of every gradient (+1: the overflow/norm scalar), as the model's 3 units assume
    assert result["params"] == 3_704_640
    assert result["params"] <= result["step_allreduce_elems"] <= result["params"] + 8
    assert result["predicted_s"] > 0 and result["measured_s"] > 0 and result["one_rank_s"] > 0
    assert "2-rank step vs model" in capsys.readouterr().out


def test_engine_overhead_bench_runs_its_three_loops_on_two_ranks():
    """bench/engine_overhead.py end to end (DDP, the engine's DeepSpeed, the engine's loop): it imports what
    the trainer uses, so a rename there breaks this and not only the benchmark."""
    proc = subprocess.run([sys.executable, "-m", "bench.engine_overhead", "--steps", "2", "--rounds", "1",
                           "--models", "demo"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ratios = [float(m.group(1)) for m in re.finditer(r"^demo .* / ddp .*\]\s+([\d.]+)\s+<=", proc.stdout, re.M)]
    assert len(ratios) == 2 and all(r > 0 for r in ratios), proc.stdout[-1500:]
