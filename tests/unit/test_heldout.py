"""The pieces of the held-out reconstruction loss (issue 32.4): masks that depend on the image's row and the seed
only (the same for every step, batch and model), and val batches whose rows, labels and images line up with the
manifest. The loss in the pretraining loop runs in tests/dist/test_heldout.py."""
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cratescale.engine.heldout import heldout_noise, rank_val_rows, val_batches
from data_pipeline.loader import choose_decoder


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    from data_pipeline.ingest import ingest

    out = tmp_path_factory.mktemp("heldout")
    return Path(ingest("synthetic://shapes?n=64&classes=4&size=32&seed=4", out, workers=0, val_per_class=5,
                       progress=False))


def test_a_mask_depends_on_its_row_and_the_seed_only():
    rows = np.array([3, 17, 40])
    alone = heldout_noise(np.array([17]), seed=0, num_patches=16)
    together = heldout_noise(rows, seed=0, num_patches=16)
    assert torch.equal(together[1], alone[0])  # whatever batch (or rank) the image is in
    assert not torch.equal(together[0], together[1])
    assert not torch.equal(heldout_noise(rows, seed=1, num_patches=16), together)
    assert together.shape == (3, 16) and 0 <= float(together.min()) and float(together.max()) < 1


def test_val_batches_line_up_with_the_manifest_across_ranks(manifest):
    table = pq.read_table(manifest, columns=["split", "label"]).to_pandas()
    val = np.flatnonzero(table["split"].to_numpy() == "val")
    assert len(val) == 20
    seen = []
    model = torch.nn.Linear(1, 1)
    for rank in (0, 1):
        rows = rank_val_rows(manifest, rank, 2)
        assert np.array_equal(rows, val[rank::2])
        for images, labels, batch_rows in val_batches(model, manifest, rows, 4, 32, choose_decoder("pil", "cpu"), 1):
            assert not model.training  # eval mode while the batches are read
            assert images.shape == (len(batch_rows), 3, 32, 32)
            assert labels.tolist() == table["label"].to_numpy()[batch_rows].tolist()
            seen += batch_rows.tolist()
        assert model.training  # and back after
    assert sorted(seen) == val.tolist()


def test_the_launch_refuses_a_heldout_loss_it_cannot_measure(manifest, tmp_path):
    from data_pipeline.ingest import ingest

    from cratescale.config import ConfigError, load_job
    from cratescale.launch.datacheck import check_heldout

    tiny = Path(__file__).resolve().parents[1] / "dist" / "tiny.yaml"
    job = load_job(tiny, [f"run_dir={tmp_path}/run", "logging.heldout_every_steps=4"])
    check_heldout(job, manifest)  # a val split, ZeRO-2: fine
    no_val = Path(ingest("synthetic://shapes?n=16&classes=2&size=32&seed=4", tmp_path / "noval", workers=0,
                         progress=False))
    with pytest.raises(ConfigError, match=rf"^logging.heldout_every_steps: {no_val} has no val split .*; set "
                                          r"data.val_per_class$"):
        check_heldout(job, no_val)
    with pytest.raises(ConfigError, match=r"^logging.heldout_every_steps: .* parallel.zero_stage 3 is not supported"):
        check_heldout(load_job(tiny, [f"run_dir={tmp_path}/run", "logging.heldout_every_steps=4",
                                      "parallel.zero_stage=3"]), manifest)
