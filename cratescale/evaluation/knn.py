"""Weighted cosine kNN (DINO's protocol): k=20 nearest train features by cosine similarity, each neighbour
votes for its label with weight exp(sim / T), T=0.07; prediction = the class with the largest vote."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def knn_predict(train_x: np.ndarray | torch.Tensor, train_y: np.ndarray | torch.Tensor,
                test_x: np.ndarray | torch.Tensor, *, k: int = 20, temperature: float = 0.07,
                num_classes: int | None = None, chunk: int = 1024, train_chunk: int = 65536,
                device: str = "cpu") -> np.ndarray:
    """Class votes (n_test, num_classes) for every test row. Test rows go in chunks of `chunk`; the train set
    in blocks of `train_chunk` with a running top-k, so memory stays chunk x train_chunk whatever the size."""
    train = torch.as_tensor(np.asarray(train_x), dtype=torch.float32)
    labels = torch.as_tensor(np.asarray(train_y), dtype=torch.long, device=device)
    test = torch.as_tensor(np.asarray(test_x), dtype=torch.float32)
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1] or len(labels) != len(train):
        raise ValueError(f"knn: bad shapes train {tuple(train.shape)}, labels {tuple(labels.shape)}, "
                         f"test {tuple(test.shape)}")
    if not (torch.isfinite(train).all() and torch.isfinite(test).all()):
        raise ValueError("knn: features contain NaN/inf (uncommitted store shards?)")
    if labels.min() < 0:
        raise ValueError("knn: labels must be >= 0")
    c = int(num_classes or int(labels.max()) + 1)
    k = min(k, len(train))
    blocks = [F.normalize(train[s:s + train_chunk].to(device), dim=1) for s in range(0, len(train), train_chunk)]
    votes = []
    for s in range(0, len(test), chunk):
        q = F.normalize(test[s:s + chunk].to(device), dim=1)
        best_sim = torch.full((len(q), 0), -2.0, device=device)
        best_idx = torch.zeros((len(q), 0), dtype=torch.long, device=device)
        offset = 0
        for block in blocks:
            sim, idx = (q @ block.T).topk(min(k, len(block)), dim=1)
            best_sim, pos = torch.cat([best_sim, sim], 1).topk(min(k, best_sim.shape[1] + sim.shape[1]), dim=1)
            best_idx = torch.cat([best_idx, idx + offset], 1).gather(1, pos)
            offset += len(block)
        w = (best_sim / temperature).exp()
        v = torch.zeros(len(q), c, device=device)
        v.scatter_add_(1, labels[best_idx], w)
        votes.append(v.cpu())
    return torch.cat(votes).numpy()


def knn_eval(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
             k: int = 20, temperature: float = 0.07, chunk: int = 1024, train_chunk: int = 65536,
             device: str = "cpu") -> dict[str, Any]:
    t0 = time.perf_counter()
    test_y = np.asarray(test_y)
    num_classes = int(max(np.max(train_y), np.max(test_y))) + 1
    votes = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, num_classes=num_classes,
                        chunk=chunk, train_chunk=train_chunk, device=device)
    top1 = float((votes.argmax(1) == test_y).mean())
    top5_k = min(5, num_classes)
    top5 = float((np.argsort(-votes, axis=1)[:, :top5_k] == test_y[:, None]).any(1).mean())
    return {"method": "knn", "top1": top1, "top5": top5, "k": int(k), "temperature": float(temperature),
            "n_train": int(len(train_y)), "n_test": int(len(test_y)), "dim": int(np.shape(train_x)[1]),
            "seconds": time.perf_counter() - t0}
