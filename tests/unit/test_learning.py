"""Learning shows in the features (issue 6): a briefly pretrained tiny CRATE-MAE gives better linear-probe
features on real CIFAR-10 images than the same architecture at initialization (same seed). Reported next to
the raw-pixel baseline (kNN, k=20, cosine)."""
import time

import numpy as np
import pandas as pd
import torch

from cratescale.evaluation.knn import knn_eval
from cratescale.evaluation.probe import linear_probe
from cratescale.models import create_model
from data_pipeline.ingest import ingest
from data_pipeline.loader import make_eval_loader, make_train_loader
from data_pipeline.sampler import LoaderState

MODEL = dict(img_size=32, patch_size=4, embed_dim=96, num_heads=4, depth=3, decoder_embed_dim=96,
             decoder_num_heads=4, decoder_depth=1)
STEPS, BATCH, PROBE_TRAIN = 250, 128, 4000


def features(model, manifest, rows):
    loader = make_eval_loader(manifest, rows, batch_size=500, image_size=32, kind="pil")
    feats, pixels, labels = [], [], []
    with torch.no_grad():
        for batch in loader:
            feats.append(model.encode(batch["images"])["mean"].numpy())
            pixels.append(batch["images"].flatten(1).numpy())
            labels.append(batch["labels"].numpy())
    return np.concatenate(feats), np.concatenate(pixels), np.concatenate(labels)


def pretrain(model, manifest):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-3, betas=(0.9, 0.95), weight_decay=0.05)
    loader = iter(make_train_loader(manifest, state=LoaderState(0, 0, 0), rank=0, world_size=1,
                                    global_batch=BATCH, micro_batch=BATCH, image_size=32,
                                    num_patches=model.num_patches, kind="pil"))
    losses = []
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = 1.5e-3 * min(1.0, (step + 1) / 20)
        batch = next(loader)
        loss, _, _ = model(batch["images"], batch["mask_noise"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_pretraining_beats_initialization_on_cifar10(tmp_path, shared_data, capsys):
    t0 = time.perf_counter()
    manifest = ingest(str(shared_data / "cifar10-train.tar.gz"), tmp_path / "cifar", val_per_class=100,
                      workers=0, progress=False)
    splits = pd.read_parquet(manifest, columns=["split"]).split.to_numpy()
    rng = np.random.default_rng(0)
    train_rows = np.sort(rng.choice(np.flatnonzero(splits == "train"), PROBE_TRAIN, replace=False))
    test_rows = np.flatnonzero(splits == "val")

    torch.manual_seed(0)
    model = create_model("crate_mae_debug", **MODEL)
    init_train, pix_train, y_train = features(model.eval(), manifest, train_rows)
    init_test, pix_test, y_test = features(model, manifest, test_rows)
    losses = pretrain(model.train(), manifest)
    trained_train, _, _ = features(model.eval(), manifest, train_rows)
    trained_test, _, _ = features(model, manifest, test_rows)

    at_init = linear_probe(init_train, y_train, init_test, y_test)["top1"]
    trained = linear_probe(trained_train, y_train, trained_test, y_test)["top1"]
    pixels_knn = knn_eval(pix_train, y_train, pix_test, y_test, k=20)["top1"]
    with capsys.disabled():
        print(f"\n[learning] CIFAR-10 probe ({PROBE_TRAIN} train / {len(test_rows)} test): pretrained "
              f"{100 * trained:.1f}% vs init {100 * at_init:.1f}% (raw-pixel kNN {100 * pixels_knn:.1f}%); "
              f"loss {losses[0]:.3f} -> {np.mean(losses[-20:]):.3f}; {time.perf_counter() - t0:.0f} s")
    assert np.mean(losses[-20:]) < 0.8 * losses[0]
    # Deterministic (seeded); measured here: 37.3% vs 35.6%, raw-pixel kNN 35.0%. A short budget moves the
    # probe by a couple of points; jobs/cifar10.yaml (12 epochs) reaches 49.3% on 45k/5k.
    assert trained > at_init + 0.01, (trained, at_init)
