"""Linear probe and weighted kNN on synthetic features; report and plots."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cratescale.evaluation import plots
from cratescale.evaluation.knn import knn_eval, knn_predict
from cratescale.evaluation.probe import linear_probe
from cratescale.evaluation.protocol import best_layer, compare, evaluate_arrays, wilson
from cratescale.evaluation.report import layers_table, results_table, write_report


def _blobs(n: int, classes: int, d: int, sep: float, seed: int):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, d)) * sep
    y = rng.integers(0, classes, n)
    return (centers[y] + rng.standard_normal((n, d))).astype(np.float32), y


@pytest.fixture(scope="module")
def separable():
    x, y = _blobs(600, 5, 16, sep=3.0, seed=0)
    return x[:400], y[:400], x[400:], y[400:]


def test_probe_separable_is_high_and_random_labels_are_chance(separable):
    tr_x, tr_y, te_x, te_y = separable
    r = linear_probe(tr_x, tr_y, te_x, te_y)
    assert r["top1"] > 0.95
    assert set(r["val_top1"]) == {1e-3, 1e-2, 1e-1, 1.0, 10.0} and r["best_C"] in r["val_top1"]
    assert r["n_train"] == 400 and r["n_test"] == 200 and r["num_classes"] == 5 and r["dim"] == 16
    rng = np.random.default_rng(1)
    chance = linear_probe(tr_x, rng.integers(0, 5, 400), te_x, rng.integers(0, 5, 200))
    assert abs(chance["top1"] - 0.2) < 0.1


def test_probe_standardizes_features(separable):
    # Scaling one feature by 1e4 must not matter: the scaler is fit on train.
    tr_x, tr_y, te_x, te_y = separable
    a = linear_probe(tr_x, tr_y, te_x, te_y)
    scale = np.ones(16, np.float32)
    scale[3] = 1e4
    b = linear_probe(tr_x * scale, tr_y, te_x * scale, te_y)
    assert abs(a["top1"] - b["top1"]) <= 0.01


def test_probe_solves_scikit_learns_objective():
    # The torch solver replaced scikit-learn's lbfgs (18 minutes on CIFAR-10's pixels): at one C, the same
    # standardized data must give the same classifier, on classes that overlap enough for C to matter.
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    x, y = _blobs(1500, 7, 24, sep=0.6, seed=3)
    for c in (1e-3, 1e-1, 10.0):
        ours = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], cs=(c,))
        ref = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)).fit(x[:1000], y[:1000])
        assert ours["best_C"] == c and abs(ours["top1"] - ref.score(x[1000:], y[1000:])) <= 0.004, (c, ours)


def test_probe_c_search_stops_past_its_peak_on_a_subset():
    # Few noisy samples in many dimensions: weak regularization overfits, so validation top-1 falls after
    # C=0.01 and the slow, weakly regularized last fit is skipped; the full search picks the same C.
    x, y = _blobs(700, 5, 200, sep=0.12, seed=4)
    early = linear_probe(x[:500], y[:500], x[500:], y[500:])
    full = linear_probe(x[:500], y[:500], x[500:], y[500:], patience=5)
    assert len(full["val_top1"]) == 5 and len(early["val_top1"]) == 4, early["val_top1"]
    tried = list(early["val_top1"].values())
    assert tried[-1] < max(tried) and tried[-2] < max(tried), early["val_top1"]
    assert early["best_C"] == full["best_C"] and early["top1"] == pytest.approx(full["top1"], abs=1e-6)
    assert early["n_search"] == 400 and linear_probe(x[:500], y[:500], x[500:], y[500:],
                                                     search_rows=150)["n_search"] == 150


def test_knn_separable_is_high_and_random_labels_are_chance(separable):
    tr_x, tr_y, te_x, te_y = separable
    r = knn_eval(tr_x, tr_y, te_x, te_y, chunk=64)
    assert r["top1"] > 0.95 and r["top5"] >= r["top1"] and r["k"] == 20 and r["temperature"] == 0.07
    rng = np.random.default_rng(2)
    chance = knn_eval(tr_x, rng.integers(0, 5, 400), te_x, rng.integers(0, 5, 200))
    assert abs(chance["top1"] - 0.2) < 0.1


def test_knn_votes_match_a_direct_transcription():
    rng = np.random.default_rng(3)
    tr_x, te_x = rng.standard_normal((50, 8)), rng.standard_normal((7, 8))
    tr_y = rng.integers(0, 4, 50)
    votes = knn_predict(tr_x, tr_y, te_x, k=5, temperature=0.1, num_classes=4, chunk=3)
    blocked = knn_predict(tr_x, tr_y, te_x, k=5, temperature=0.1, num_classes=4, chunk=2, train_chunk=3)
    np.testing.assert_allclose(blocked, votes, rtol=1e-6)
    a = tr_x / np.linalg.norm(tr_x, axis=1, keepdims=True)
    for i, q in enumerate(te_x):
        sim = a @ (q / np.linalg.norm(q))
        want = np.zeros(4)
        for j in np.argsort(-sim)[:5]:
            want[tr_y[j]] += np.exp(sim[j] / 0.1)
        np.testing.assert_allclose(votes[i], want, rtol=1e-4)


def test_bad_inputs_are_refused(separable):
    tr_x, tr_y, te_x, te_y = separable
    bad = tr_x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        linear_probe(bad, tr_y, te_x, te_y)
    with pytest.raises(ValueError, match="NaN"):
        knn_eval(bad, tr_y, te_x, te_y)
    with pytest.raises(ValueError, match="dim"):
        linear_probe(tr_x, tr_y, te_x[:, :3], te_y)
    with pytest.raises(ValueError, match="shapes"):
        knn_predict(tr_x, tr_y[:-1], te_x)


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_write_report_and_plots(tmp_path, separable):
    tr_x, tr_y, te_x, te_y = separable
    results = {"cls/knn": knn_eval(tr_x, tr_y, te_x, te_y), "cls/linear_probe": linear_probe(tr_x, tr_y, te_x, te_y)}
    table = results_table(results)
    assert table.count("\n") == 4 and "| cls | linear_probe |" in table
    rng = np.random.default_rng(0)
    diag = {"curves": {"coding_rate_subspace": [5.0, 4.0, 3.0], "zero_fraction": [0.2, 0.4, 0.6]},
            "curves_std": {"coding_rate_subspace": [0.1, 0.1, 0.1], "zero_fraction": [0.01, 0.02, 0.03]},
            "attention": rng.random((2, 3, 4, 4)), "pca": rng.random((2, 4, 4, 3)), "eps_sq": 0.5}
    images = torch.randn(2, 3, 32, 32)
    written = write_report(tmp_path / "rep", results=results, diagnostics=diag, images=images,
                           extra={"note": np.float32(1.5)})
    for name in ("results.png", "layers.png", "attention.png", "pca.png"):
        assert _is_png(written[name]), name
    metrics = json.loads(written["metrics.json"].read_text())
    assert metrics["results"]["cls/knn"]["top1"] == results["cls/knn"]["top1"]
    assert metrics["diagnostics"]["curves"]["zero_fraction"] == [0.2, 0.4, 0.6]
    assert "attention" not in metrics["diagnostics"] and metrics["extra"]["note"] == 1.5
    assert (tmp_path / "rep" / "results.md").read_text().endswith(table)
    img = rng.random((2, 16, 16, 3))
    assert _is_png(plots.plot_reconstruction_grid(img, img * 0.5, img, tmp_path / "r.png"))
    with pytest.raises(ValueError, match="no curves"):
        plots.plot_layer_curves({}, tmp_path / "x.png")


def test_baselines_side_by_side_and_best_layer(tmp_path, separable):
    # The same protocol on a strong, a weaker and a useless feature set: the table shows all three and the
    # differences in points; the per-layer table names the layer with the best probe.
    tr_x, tr_y, te_x, te_y = separable
    rng = np.random.default_rng(4)
    noise_tr, noise_te = rng.standard_normal(tr_x.shape), rng.standard_normal(te_x.shape)

    def run(a, b):
        return {"knn": knn_eval(a, tr_y, b, te_y), "linear_probe": linear_probe(a, tr_y, b, te_y)}

    good, weak, bad = run(tr_x, te_x), run(tr_x + 3 * noise_tr, te_x + 3 * noise_te), run(noise_tr, noise_te)
    results = {f"mean/{m}": r for m, r in good.items()}
    baselines = {"init": {f"mean/{m}": r for m, r in weak.items()}, "pixels": {f"pixels/{m}": r for m, r in bad.items()}}
    table = compare(results, baselines)
    for m in ("knn", "linear_probe"):
        row = table[f"mean/{m}"]
        assert row["pretrained"] == 100 * good[m]["top1"] and row["pixels"] == 100 * bad[m]["top1"]
        assert row["vs_init"] == row["pretrained"] - 100 * weak[m]["top1"] and row["vs_pixels"] > 40
    assert compare(results, {})["mean/knn"]["init"] is None
    layers = {"pretrained": {1: bad, 2: good, 3: weak}, "init": {1: bad, 2: bad, 3: bad}}
    assert best_layer(layers["pretrained"]) == {"layer": 2, "method": "linear_probe", "top1": good["linear_probe"]["top1"]}
    assert best_layer({}) is None
    text = layers_table(layers, best_layer(layers["pretrained"]))
    assert "| knn pretrained | knn init | linear_probe pretrained | linear_probe init |" in text
    assert "Best layer (pretrained, linear_probe): 2" in text
    written = write_report(tmp_path / "rep", results=results, baselines=baselines, layers=layers)
    md = written["results.md"].read_text()
    assert f"{table['mean/knn']['vs_pixels']:+.2f}" in md and "Best layer" in md
    assert _is_png(written["results.png"]) and _is_png(written["layers.png"])
    metrics = json.loads(written["metrics.json"].read_text())
    assert metrics["best_layer"]["layer"] == 2 and set(metrics["layers"]) == {"pretrained", "init"}


def test_wilson_interval():
    # 200 test images at 50%: about +-7 points (the number); never outside [0, 1], even at 0 or n.
    low, high = wilson(100, 200)
    assert (round(100 * low, 1), round(100 * high, 1)) == (43.1, 56.9)
    assert wilson(0, 20)[0] == 0.0 and 0.1 < wilson(0, 20)[1] < 0.2 and wilson(20, 20)[1] == 1.0
    assert wilson(0, 0) == (0.0, 1.0)


def test_report_carries_its_context_intervals_and_a_reading(tmp_path, separable, monkeypatch):
    """Run, step, set and sizes on every figure and the table; a 95% interval beside every accuracy; whole axes;
    a colour bar, the layer and the query on the attention map; a one-line reading when pretrained loses to a
    baseline (here raw pixels: the 'pretrained' features are noise)."""
    tr_x, tr_y, te_x, te_y = separable
    rng = np.random.default_rng(5)
    noise = evaluate_arrays(rng.standard_normal(tr_x.shape), tr_y, rng.standard_normal(te_x.shape), te_y)
    pixels = evaluate_arrays(tr_x, tr_y, te_x, te_y)
    results = {f"mean/{m}": r for m, r in noise.items()}
    baselines = {"pixels": {f"pixels/{m}": r for m, r in pixels.items()}}
    figures = {}
    save = plots._save

    def spy(fig, path):  # what a reader sees on each figure, read from the figure itself before it is saved
        figures[Path(path).name] = {
            "title": fig._suptitle.get_text() if fig._suptitle else " ".join(a.get_title() for a in fig.axes),
            "colorbars": [a.get_ylabel() for a in fig.axes if a.get_label() == "<colorbar>"],
            "ylims": [a.get_ylim() for a in fig.axes if a.get_label() != "<colorbar>" and a.axison]}
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    diag = {"curves": {"coding_rate": [5.0, 4.9, 4.95], "zero_fraction": [0.40, 0.41, 0.42]}, "depth": 3,
            "attention": rng.random((2, 3, 4, 4)), "pca": rng.random((2, 4, 4, 3))}
    layers = {"pretrained": {1: noise, 2: noise}}
    context = {"run": "cifar10", "step": 300, "set": "pretrain"}
    written = write_report(tmp_path / "rep", results=results, baselines=baselines, diagnostics=diag, layers=layers,
                           images=torch.randn(2, 3, 32, 32), context=context)
    about = "run cifar10, step 300, set pretrain: 400 train / 200 test images"
    md = written["results.md"].read_text()
    assert md.startswith(f"# Results: {about}\n") and "95% Wilson interval" in md
    probe = results["mean/linear_probe"]
    low, high = (100 * v for v in probe["top1_ci95"])
    assert f"| {100 * probe['top1']:.2f} [{low:.1f}, {high:.1f}] |" in md
    pix = pixels["linear_probe"]
    assert f"{100 * pix['top1']:.2f} [{100 * pix['top1_ci95'][0]:.1f}, {100 * pix['top1_ci95'][1]:.1f}]" in md
    assert low < 100 * probe["top1"] < high and high - low > 8  # 200 images near chance: wide
    reading = [line for line in md.splitlines() if line.startswith("Reading: ")]
    assert len(reading) == 1 and "is below raw pixels" in reading[0], md
    assert json.loads(written["metrics.json"].read_text())["context"]["about"] == about
    for name in ("results.png", "layers.png", "attention.png", "pca.png"):
        assert "cifar10" in figures[name]["title"] and "300" in figures[name]["title"], (name, figures[name])
    assert about in figures["results.png"]["title"] and about in figures["layers.png"]["title"]
    assert "layer 3" in figures["attention.png"]["title"] and "query" in figures["attention.png"]["title"]
    assert figures["attention.png"]["colorbars"] == ["attention weight of the cls query"]
    assert "layer 3" in figures["pca.png"]["title"]
    assert all(lim[0] == 0 for lim in figures["layers.png"]["ylims"]), figures["layers.png"]  # whole axes
    assert (0, 100) in [tuple(lim) for lim in figures["layers.png"]["ylims"]]
    good = write_report(tmp_path / "good", results={f"mean/{m}": r for m, r in pixels.items()}, context=context)
    assert "Reading:" not in good["results.md"].read_text()  # no note where pretrained is not below a baseline
