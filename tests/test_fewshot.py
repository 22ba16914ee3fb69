import numpy as np
import pytest

from bigtrain.eval.fewshot import fewshot_accuracy


def blobs(rng, n, centers, noise):
    y = rng.integers(0, len(centers), n)
    return centers[y] + noise * rng.normal(size=(n, centers.shape[1])), y


def test_separable_problem_is_solved_and_random_features_are_chance() -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, 48)) * 2.0
    tx, ty = blobs(rng, 600, centers, 1.0)
    vx, vy = blobs(rng, 600, centers, 1.0)
    acc = fewshot_accuracy(tx, ty, vx, vy, 6, [1, 5, 10], seeds=3)
    assert set(acc) == {1, 5, 10}
    assert acc[10] > 0.97 and acc[5] > 0.95
    assert acc[1] <= acc[5] + 0.02  # more shots never hurt much
    noise = fewshot_accuracy(rng.normal(size=(600, 48)), ty, rng.normal(size=(600, 48)), vy, 6, [10], seeds=3)
    assert noise[10] == pytest.approx(1 / 6, abs=0.08)


def test_primal_and_dual_forms_agree() -> None:
    # 10 shots x 3 classes = 30 points: D=8 < N uses the primal form, D=64 > N the dual.
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(3, 8)) * 3
    tx, ty = blobs(rng, 300, centers, 1.0)
    vx, vy = blobs(rng, 300, centers, 1.0)
    pad = lambda a: np.concatenate([a, np.zeros((len(a), 56))], axis=1)  # noqa: E731 - zero features change nothing
    a = fewshot_accuracy(tx, ty, vx, vy, 3, [10], seeds=2)
    b = fewshot_accuracy(pad(tx), ty, pad(vx), vy, 3, [10], seeds=2)
    assert a[10] == pytest.approx(b[10], abs=1e-9)
