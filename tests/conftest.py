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
