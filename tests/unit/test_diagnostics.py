"""White-box diagnostics against independent float64 numpy transcriptions of the formulas."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cratescale.evaluation.diagnostics import (cls_attention_maps, coding_rate, pca_rgb, reconstructions,
                                               run_diagnostics, sparsity_stats, subspace_coding_rate)
from cratescale.evaluation.plots import plot_reconstructions
from cratescale.models import create_model


def np_rate(z: np.ndarray, eps_sq: float) -> float:
    """R(Z) = 1/2 logdet(I_d + d/(N eps^2) Z^T Z), Z (N, d)."""
    n, d = z.shape
    sign, logdet = np.linalg.slogdet(np.eye(d) + d / (n * eps_sq) * z.T @ z)
    assert sign > 0
    return 0.5 * logdet


def np_subspace_rate(z: np.ndarray, u: np.ndarray, heads: int, eps_sq: float) -> float:
    """R^c = sum_k 1/2 logdet(I_N + p/(N eps^2) (U_k^T Z^T)^T (U_k^T Z^T)), columns-are-tokens notation."""
    n, d = z.shape
    p = u.shape[0] // heads
    total = 0.0
    for k in range(heads):
        uk = u[k * p:(k + 1) * p].T          # (d, p): head k's subspace basis
        proj = uk.T @ z.T                    # (p, N)
        total += 0.5 * np.linalg.slogdet(np.eye(n) + p / (n * eps_sq) * proj.T @ proj)[1]
    return total


@pytest.mark.parametrize("n,d", [(10, 6), (6, 10), (17, 17)])
@pytest.mark.parametrize("eps_sq", [0.5, 0.01])
def test_coding_rate_matches_numpy(n, d, eps_sq):
    rng = np.random.default_rng(n * d)
    z = rng.standard_normal((3, n, d))
    got = coding_rate(torch.from_numpy(z).float(), eps_sq)
    assert got.shape == (3,) and got.dtype == torch.float64
    want = [np_rate(z[i].astype(np.float32).astype(np.float64), eps_sq) for i in range(3)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9)


def test_subspace_coding_rate_matches_numpy():
    rng = np.random.default_rng(0)
    z, u = rng.standard_normal((2, 13, 12)), rng.standard_normal((12, 12)) / 3
    got = subspace_coding_rate(torch.from_numpy(z), torch.from_numpy(u), num_heads=3)
    want = [np_subspace_rate(z[i], u, 3, 0.5) for i in range(2)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    # One head spanning everything reduces to the plain rate of Z U^T.
    one = subspace_coding_rate(torch.from_numpy(z), torch.from_numpy(u), num_heads=1)
    np.testing.assert_allclose(one.numpy(), [np_rate(z[i] @ u.T, 0.5) for i in range(2)], rtol=1e-10)


def test_crate_visualisation_convention():
    # Ma-Lab-Berkeley/CRATE vis_utils/coding_rate.py: tokens L2-normalized per head, p / (N * 0.01).
    rng = np.random.default_rng(1)
    z, u = rng.standard_normal((9, 8)), rng.standard_normal((8, 8))
    w = (z @ u.T).reshape(9, 2, 4).transpose(1, 0, 2)           # (heads, N, p)
    w = w / np.linalg.norm(w, axis=-1, keepdims=True)
    want = sum(0.5 * np.linalg.slogdet(np.eye(9) + 4 / (9 * 0.01) * wk @ wk.T)[1] for wk in w)
    got = subspace_coding_rate(torch.from_numpy(z), torch.from_numpy(u), 2, eps_sq=0.01, normalize_heads=True)
    np.testing.assert_allclose(float(got), want, rtol=1e-10)


def test_coding_rate_prefers_low_rank():
    rng = np.random.default_rng(2)
    full = rng.standard_normal((64, 16))
    low = np.outer(rng.standard_normal(64), rng.standard_normal(16))
    low *= np.linalg.norm(full) / np.linalg.norm(low)
    assert float(coding_rate(torch.from_numpy(low))) < 0.5 * float(coding_rate(torch.from_numpy(full)))


def test_sparsity_matches_numpy():
    rng = np.random.default_rng(3)
    z = np.maximum(rng.standard_normal((2, 5, 7)), 0)
    z[1, 2] = 0.0                                                  # an all-zero token
    got = {k: v.numpy() for k, v in sparsity_stats(torch.from_numpy(z).float()).items()}
    z32 = z.astype(np.float32).astype(np.float64)
    for b in range(2):
        assert got["zero_fraction"][b] == pytest.approx(np.mean(z32[b] == 0))
        l0 = np.count_nonzero(z32[b], axis=1)
        l1 = np.abs(z32[b]).sum(1)
        assert got["l0"][b] == pytest.approx(l0.mean())
        assert got["l1"][b] == pytest.approx(l1.mean())
        keep = l1 > 0
        assert got["l0_over_l1"][b] == pytest.approx(np.mean(l0[keep] / l1[keep]))


def test_attention_and_pca_helpers():
    attn = torch.softmax(torch.randn(2, 3, 17, 17), -1)
    maps = cls_attention_maps(attn, 4)
    assert maps.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(maps.reshape(2, 3, -1).sum(-1), 1 - attn[:, :, 0, 0].numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="tokens"):
        cls_attention_maps(attn, 5)
    feats = torch.randn(2, 16, 10, generator=torch.Generator().manual_seed(0))
    rgb = pca_rgb(feats, 4)
    assert rgb.shape == (2, 4, 4, 3) and rgb.min() == 0.0 and rgb.max() == 1.0
    # Fixed component signs: negated features project to negated scores, i.e. inverted colours.
    np.testing.assert_allclose(pca_rgb(-feats, 4), 1 - rgb, atol=1e-9)
    np.testing.assert_array_equal(pca_rgb(feats.clone(), 4), rgb)


@pytest.fixture(scope="module")
def model_and_images():
    torch.manual_seed(0)
    return create_model("crate_mae_debug").eval(), torch.randn(3, 3, 32, 32)


def test_run_diagnostics_matches_direct_computation(model_and_images):
    model, images = model_and_images
    d = run_diagnostics(model, images)
    assert d["depth"] == 2 and d["attention"].shape == (3, 4, 4, 4) and d["pca"].shape == (3, 4, 4, 3)
    out = model.encode(images, layers=True)
    for i in range(2):
        z = out["mssa_in"][i].detach().double().numpy()
        u = model.blocks[i].mssa.u.weight.detach().double().numpy()
        want = np.mean([np_subspace_rate(z[b], u, 4, 0.5) for b in range(3)])
        assert d["curves"]["coding_rate_subspace"][i] == pytest.approx(want, rel=1e-5)
        assert d["curves"]["coding_rate"][i] == pytest.approx(np.mean([np_rate(z[b], 0.5) for b in range(3)]),
                                                              rel=1e-5)
        ista = out["layers"][i].detach().numpy()
        assert ista.min() >= 0
        assert d["curves"]["zero_fraction"][i] == pytest.approx(np.mean(ista == 0), abs=1e-9)


def test_reconstructions_and_plot(model_and_images, tmp_path):
    model, images = model_and_images
    r = reconstructions(model, images, seed=1)
    assert r["mask_ratio"] == 0.75
    for key in ("original", "masked", "reconstruction"):
        assert r[key].shape == (3, 32, 32, 3) and 0 <= r[key].min() and r[key].max() <= 1
    # Visible patches are pasted back unchanged; masked ones differ from the masked input.
    same = np.isclose(r["reconstruction"], r["original"], atol=1e-6).all(-1)
    assert 0.2 < same.mean() < 0.3
    path = plot_reconstructions(model, images, tmp_path / "rec.png", seed=1)
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 1000
