"""Data preflight (issue 14.1): after a real ingest and before anything is queued, a job whose data cannot
train, or whose transfer set does not ingest to a usable manifest, ends with one line and exit 2."""
from __future__ import annotations

import pytest

from tests.conftest import REPO

DEMO = REPO / "jobs" / "demo.yaml"


@pytest.fixture
def cli(monkeypatch, capsys, ray_session):
    """main(argv) -> (exit code, stderr, stages started); ingest is real, every later stage a tripwire."""
    import cratescale.launch.run as run
    from cratescale.launch.__main__ import main

    started: list[str] = []
    stages = dict(run.STAGES)
    for name in ("pretrain", "export", "extract", "evaluate"):
        stages[name] = lambda *a, name=name, **k: started.append(name)
    monkeypatch.setattr(run, "STAGES", stages)
    monkeypatch.setattr(run, "start_ray", lambda address: None)  # the session's Ray

    def call(*argv: str) -> tuple[int, str, list[str]]:
        code = main([str(DEMO), *argv])
        out, err = capsys.readouterr()  # ingest's progress bar, then the error: one line, the last
        return code, err.strip().splitlines()[-1] if code else out + err, started
    return call


def shapes(n: int, classes: int) -> str:
    return f"data.source=synthetic://shapes?n={n}&classes={classes}&size=16&seed=0"


def test_val_per_class_that_empties_classes_is_refused(cli, tmp_path):
    code, err, started = cli(f"run_dir={tmp_path}/run", shapes(40, 4), "data.val_per_class=10")
    assert code == 2 and not started, err
    assert err.startswith("error: ") and "data.val_per_class: val_per_class 10 leaves 4 of 4 classes without a " \
                                    "training sample" in err, err


def test_fewer_training_samples_than_one_global_batch_is_refused(cli, tmp_path):
    code, err, started = cli(f"run_dir={tmp_path}/run", shapes(64, 4), "data.val_per_class=2")
    assert code == 2 and not started, err
    assert err.startswith("error: ") and "56 training samples" in err and "fewer than one global batch (64" in err, err


def test_transfer_set_checked_before_pretraining_is_queued(cli, tmp_path):
    transfer = "extract.datasets=[{name: t, source: 'synthetic://shapes?n=8&classes=4&size=16', val_per_class: 5}]"
    code, err, started = cli(f"run_dir={tmp_path}/run", shapes(256, 4), transfer)
    assert code == 2 and not started, err
    assert err.startswith("error: ") and "extract.datasets.0.val_per_class: val_per_class 5 leaves 4 of 4" in err, err
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "a.jpg").write_bytes(b"not a jpeg")
    code, err, started = cli(f"run_dir={tmp_path}/run2", shapes(256, 4),
                             f"extract.datasets=[{{name: t, source: {empty}}}]")
    assert code == 2 and not started, err
    assert err.startswith(f"error: extract.datasets.0.source: {empty} does not ingest"), err


def test_good_data_passes_to_the_stages(cli, tmp_path):
    code, err, started = cli(f"run_dir={tmp_path}/run", shapes(256, 4), "data.val_per_class=2")
    assert code == 0 and started == ["pretrain", "export", "extract", "evaluate"], err


def test_a_manifest_made_with_other_settings_is_resplit_or_rebuilt(cli, tmp_path):
    """Issue 29.9: the manifest records the ingest settings that shaped it; a changed split is re-split, another
    shard size rebuilt, and the preflight's lines name the values the manifest was made with (before: a manifest
    of the same source was kept whatever the job now said, and the preflight blamed the job's val_per_class)."""
    from data_pipeline.ingest import ingest
    from data_pipeline.manifest import manifest_info

    run = f"run_dir={tmp_path}/run"
    code, err, _ = cli(run, shapes(256, 4), "data.val_per_class=64")
    assert code == 2 and "val_per_class 64 leaves 4 of 4 classes" in err, err
    code, err, started = cli(run, shapes(256, 4), "data.val_per_class=0")
    assert code == 0 and started == ["pretrain", "export", "extract", "evaluate"], err
    assert "val_per_class 64 (the job sets 0): re-split with val_per_class 0" in " ".join(err.split()), err
    code, err, _ = cli(run, shapes(256, 4), "data.val_per_class=2")
    assert code == 0, err
    manifest = tmp_path / "run" / "data" / "manifest.parquet"
    fresh = ingest(shapes(256, 4).split("=", 1)[1], tmp_path / "fresh", val_per_class=2, workers=0, progress=False)
    assert manifest_info(manifest).fingerprint == manifest_info(fresh).fingerprint  # the split a rebuild gives
    assert manifest_info(manifest).settings == manifest_info(fresh).settings
    code, err, _ = cli(run, shapes(256, 4), "data.val_per_class=2", "data.shard_size=100")
    assert code == 0 and "shard_size 1000 (the job sets 100): building it" in " ".join(err.split()), err
    assert manifest_info(manifest).settings["shard_size"] == 100
    code, err, _ = cli(run, shapes(256, 4), "data.val_per_class=3", "data.shard_size=100", "stages=[pretrain]")
    assert code == 2 and "was made with val_per_class 2 (the job sets 3), and the ingest stage is not in the job" \
        in err, err
