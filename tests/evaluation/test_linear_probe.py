from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from look.evaluation import (
    LinearProbeOptions,
    fit_logistic_regression,
    linear_probe,
    predict_logistic_regression,
    standardize,
    stratified_validation_split,
)


def blobs(
    n: int, dim: int, classes: int, *, spread: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return centres[labels] + spread * torch.randn(n, dim, generator=g), labels


def test_coefficients_and_predictions_agree_with_scikit_learn() -> None:
    x, y = blobs(700, 6, 4, spread=1.0, seed=0)
    train_x, test_x = standardize(x[:400], x[400:])
    train_y, test_y = y[:400], y[400:]
    for c in (0.01, 1.0):
        ours = fit_logistic_regression(train_x, train_y, c=c, tolerance=1e-7)
        reference = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(
            train_x.double().numpy(), train_y.numpy()
        )
        assert ours.converged
        np.testing.assert_allclose(ours.weight.numpy(), reference.coef_, atol=5e-3)
        # Softmax intercepts are defined up to a common shift: compare them centred.
        np.testing.assert_allclose(
            (ours.bias - ours.bias.mean()).numpy(),
            reference.intercept_ - reference.intercept_.mean(),
            atol=5e-3,
        )
        predicted = predict_logistic_regression(ours, test_x).numpy()
        expected = reference.predict(test_x.double().numpy())
        ours_acc = 100 * (predicted == test_y.numpy()).mean()
        reference_acc = 100 * (expected == test_y.numpy()).mean()
        assert abs(ours_acc - reference_acc) <= 0.5
        assert (predicted == expected).mean() >= 0.99


def test_stronger_regularisation_shrinks_the_weights() -> None:
    x, y = blobs(200, 5, 3, spread=0.5, seed=1)
    (x,) = standardize(x)
    norms = [fit_logistic_regression(x, y, c=c).weight.norm().item() for c in (1e-3, 1e-1, 10.0)]
    assert norms[0] < norms[1] < norms[2]


def test_standardize_uses_train_statistics_and_keeps_constant_columns_finite() -> None:
    train = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    test = torch.tensor([[2.0, 6.0]])
    train_std, test_std = standardize(train, test)
    assert torch.allclose(train_std, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    assert torch.allclose(test_std, torch.tensor([[0.0, 1.0]]))


def test_stratified_split_is_seeded_and_keeps_every_class() -> None:
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    fit, val = stratified_validation_split(labels, 0.2, seed=0)
    again_fit, again_val = stratified_validation_split(labels, 0.2, seed=0)
    assert torch.equal(val, again_val) and torch.equal(fit, again_fit)
    assert sorted(labels[val].tolist()) == [0, 0, 1]  # 20 % of 10, of 5; the single image stays
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(16))
    other_val = stratified_validation_split(labels, 0.2, seed=1)[1]
    assert not torch.equal(val, other_val)


def test_probe_chooses_c_on_validation_and_reports_the_curve() -> None:
    train_x, train_y = blobs(300, 8, 3, spread=1.5, seed=2)
    g = torch.Generator().manual_seed(5)
    test_x = train_x[:120] + 0.1 * torch.randn(120, 8, generator=g)
    test_y = train_y[:120]
    grid = (1e-3, 1e-1, 10.0)
    result = linear_probe(
        train_x, train_y, test_x, test_y, options=LinearProbeOptions(c_grid=grid), seed=0
    )
    curve = result["validation_curve"]
    assert [point["c"] for point in curve] == list(grid)
    best = max(curve, key=lambda point: point["val_top1"])
    assert result["best_c"] == best["c"]
    assert result["num_fit"] + result["num_val"] == 300 and result["num_val"] == 60
    assert result["top1"] > 60.0 and 0.0 <= result["mean_per_class_accuracy"] <= 100.0
    fixed = linear_probe(train_x, train_y, test_x, test_y, options=LinearProbeOptions(c=0.1))
    assert fixed["best_c"] == 0.1 and fixed["validation_curve"] == []


def test_bad_inputs_are_refused() -> None:
    x, y = blobs(20, 3, 2, spread=1.0, seed=0)
    with pytest.raises(ValueError, match="C values must be finite and > 0"):
        linear_probe(x, y, x, y, options=LinearProbeOptions(c_grid=(0.0,)))
    with pytest.raises(ValueError, match="val_fraction"):
        linear_probe(x, y, x, y, options=LinearProbeOptions(val_fraction=1.0))
    with pytest.raises(ValueError, match="train and test images"):
        linear_probe(x[:0], y[:0], x, y)
