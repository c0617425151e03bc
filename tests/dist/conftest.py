"""A small synthetic dataset, ingested once for all 2-process tests."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE_JOB = REPO / "tests" / "dist" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory) -> Path:
    from data_pipeline.ingest import ingest

    out = tmp_path_factory.mktemp("tiny_data")
    return Path(ingest("synthetic://shapes?n=192&classes=4&size=32&seed=1", out, workers=1))
