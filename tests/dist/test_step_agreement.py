"""One collective per step for what the ranks decide together (issue 31.5): stop, the step's bad samples and the
asynchronous commit in flight travel in one all-reduce (engine/agreement.py). Counted on 2 real DeepSpeed ranks
(gloo, the tiny job's DALI + bf16): cratescale's own collectives grow by exactly one per extra step (before this
change, by two or three: a stop flag, the bad-data counts, the commit poll)."""
from __future__ import annotations

import pytest

from tests.dist.harness import run_ranks, write_config

pytestmark = pytest.mark.dist
TINY = "tests/dist/tiny.yaml"


def _collectives(tmp_path, tiny_manifest, monkeypatch, steps: int) -> dict[str, int]:
    monkeypatch.setenv("COUNT_COLLECTIVES", "1")
    config = write_config(TINY, tmp_path / f"run{steps}", [
        f"schedule.steps={steps}", "checkpoint.every_steps=1000", "logging.every_steps=1000",
        "checkpoint.async_commit=true"])  # one commit (the final one) and one logging window in either run
    results = run_ranks(config, tiny_manifest, 2)
    assert [r["step"] for r in results] == [steps, steps]
    assert results[0]["collectives"] == results[1]["collectives"], "ranks must issue the same collectives"
    return results[0]["collectives"]


def test_one_collective_per_step(tmp_path, tiny_manifest, monkeypatch):
    short, long = (_collectives(tmp_path, tiny_manifest, monkeypatch, steps) for steps in (3, 7))
    grown = {name: long.get(name, 0) - short.get(name, 0) for name in set(short) | set(long)}
    assert {name: n for name, n in grown.items() if n} == {"cratescale.engine.agreement.all_reduce": 4}, grown
