"""Shared fixtures: one local Ray for the whole session (Ray starts in seconds and takes ~1.4 GB)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        from data_pipeline.local_ray import start_or_join_ray

        start_or_join_ray(num_cpus=2)
    yield ray
    # Left running for the rest of the session; pytest's exit shuts it down.


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the tests need the project's shared data")
    return SHARED_DATA


_TIER_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report) -> None:
    """Setup, call and teardown time per tier (tests/<tier>/...): CI's budget is the suite's, the tiers say where
    it goes."""
    parts = report.nodeid.split("/")
    tier = parts[1] if len(parts) > 2 and parts[0] == "tests" else "other"
    _TIER_SECONDS[tier] = _TIER_SECONDS.get(tier, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter) -> None:
    if _TIER_SECONDS:
        tiers = ", ".join(f"{tier} {seconds / 60:.1f} min" for tier, seconds in _TIER_SECONDS.items())
        terminalreporter.write_line(f"tier times (setup + call + teardown): {tiers}; "
                                    f"{sum(_TIER_SECONDS.values()) / 60:.1f} min in all")
