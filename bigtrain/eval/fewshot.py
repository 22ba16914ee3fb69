"""Few-shot linear probes on frozen features (big_vision-style closed-form ridge).

For each shot count k and each seed: draw k training examples per class, fit
L2-regularised least squares from standardised features (+ an almost
unregularised bias column) to {-1, +1} one-hot targets, pick the ridge strength
on held-out training examples (never on the test set), report test top-1.
One eigendecomposition per draw serves the whole ridge grid.
"""

from __future__ import annotations

import numpy as np

BIAS_CONSTANT = 100.0  # large feature value => its weight is barely regularised


def _fit_predict(x: np.ndarray, y1: np.ndarray, queries: list[np.ndarray], l2_grid: list[float]) -> list[list[np.ndarray]]:
    """Ridge solutions for every l2 in the grid; returns predictions[l2][query]."""
    mean, std = x.mean(axis=0, keepdims=True), x.std(axis=0, keepdims=True) + 1e-5

    def prep(a: np.ndarray) -> np.ndarray:
        a = (a - mean) / std
        return np.concatenate([a, np.full((a.shape[0], 1), BIAS_CONSTANT)], axis=1)

    xs, qs = prep(x), [prep(q) for q in queries]
    n, d = xs.shape
    out = []
    if n < d:  # dual form: W = X^T (X X^T + l2 I)^-1 Y
        eig, vec = np.linalg.eigh(xs @ xs.T)
        vty = vec.T @ y1
        for l2 in l2_grid:
            w = xs.T @ (vec @ (vty / (eig + l2)[:, None]))
            out.append([q @ w for q in qs])
    else:  # primal form: W = (X^T X + l2 I)^-1 X^T Y
        eig, vec = np.linalg.eigh(xs.T @ xs)
        vtxy = vec.T @ (xs.T @ y1)
        for l2 in l2_grid:
            w = vec @ (vtxy / (eig + l2)[:, None])
            out.append([q @ w for q in qs])
    return out


def fewshot_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    shots: list[int],
    seeds: int = 3,
    l2_grid: list[float] | None = None,
    val_per_class: int = 20,
) -> dict[int, float]:
    """Mean test top-1 over ``seeds`` draws for each shot count."""
    l2_grid = l2_grid or [2.0**k for k in range(-10, 11, 2)]
    train_x = np.asarray(train_x, dtype=np.float64)
    test_x = np.asarray(test_x, dtype=np.float64)
    by_class = [np.flatnonzero(train_y == c) for c in range(num_classes)]
    results: dict[int, float] = {}
    for k in shots:
        accs = []
        for seed in range(seeds):
            rng = np.random.default_rng([seed, k])
            shot_ids, val_ids = [], []
            for ids in by_class:
                perm = rng.permutation(ids)
                shot_ids.append(perm[:k])
                val_ids.append(perm[k : k + val_per_class])
            s_ids, v_ids = np.concatenate(shot_ids), np.concatenate(val_ids)
            if len(s_ids) == 0:
                continue
            y1 = 2.0 * np.eye(num_classes)[train_y[s_ids]] - 1.0
            queries = [test_x] + ([train_x[v_ids]] if len(v_ids) else [])
            preds = _fit_predict(train_x[s_ids], y1, queries, l2_grid)
            if len(v_ids):
                val_acc = [float((p[1].argmax(1) == train_y[v_ids]).mean()) for p in preds]
                best = int(np.argmax(val_acc))
            else:  # no held-out samples left: fall back to the middle of the grid
                best = len(l2_grid) // 2
            accs.append(float((preds[best][0].argmax(1) == test_y).mean()))
        if accs:
            results[k] = float(np.mean(accs))
    return results
