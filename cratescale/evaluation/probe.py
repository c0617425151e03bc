"""Linear probe on stored embeddings: standardize (fit on train), multinomial logistic regression (lbfgs),
C picked on a validation split carved from train, refit on all of train, top-1 on the test split."""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
# BLAS threads for the fits. lbfgs here multiplies small matrices thousands of times, where thread hand-offs
# dominate: on the 2-core dev machine under load, 4,000 x 96 features took 9.7 s with OpenBLAS's 2 threads
# and 0.2 s with 1 (45,000 x 192: 2.1 s with 1).
PROBE_THREADS = 1


def _check(x: np.ndarray, y: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"linear_probe: {what} needs features (n, d) and labels (n,), got {x.shape}, {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"linear_probe: {what} features contain NaN/inf (uncommitted store shards?)")
    return x, y


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int):
    # lbfgs on a multi-class target is the multinomial (softmax) model in scikit-learn >= 1.5.
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter))
    return clf.fit(x, y)


def _carve(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int):
    counts = np.unique(y, return_counts=True)[1]
    n_val = max(1, int(round(len(y) * val_fraction)))
    stratify = y if counts.min() >= 2 and n_val >= len(counts) else None
    return train_test_split(x, y, test_size=n_val, random_state=seed, stratify=stratify)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 cs: Sequence[float] = DEFAULT_CS, val_fraction: float = 0.2, seed: int = 0,
                 max_iter: int = 1000) -> dict[str, Any]:
    """Top-1 of a linear probe; the regularization C is chosen on a held-out part of train."""
    train_x, train_y = _check(train_x, train_y, "train")
    test_x, test_y = _check(test_x, test_y, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"linear_probe: train dim {train_x.shape[1]} != test dim {test_x.shape[1]}")
    if len(np.unique(train_y)) < 2:
        raise ValueError("linear_probe: train labels have a single class")
    t0 = time.perf_counter()
    fit_x, val_x, fit_y, val_y = _carve(train_x, train_y, val_fraction, seed)
    val_top1 = {}
    with threadpool_limits(PROBE_THREADS):
        for c in cs:
            val_top1[float(c)] = float((_fit(fit_x, fit_y, c, max_iter).predict(val_x) == val_y).mean())
        best_c = max(val_top1, key=lambda c: (val_top1[c], -c))  # ties: the stronger regularization
        clf = _fit(train_x, train_y, best_c, max_iter)
        top1 = float((clf.predict(test_x) == test_y).mean())
    return {"method": "linear_probe", "top1": top1, "best_C": best_c, "val_top1": val_top1,
            "n_train": int(len(train_y)), "n_test": int(len(test_y)), "dim": int(train_x.shape[1]),
            "num_classes": int(len(np.unique(train_y))), "seconds": time.perf_counter() - t0}
