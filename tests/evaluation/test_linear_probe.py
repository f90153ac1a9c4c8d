from __future__ import annotations

import warnings

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
from look.evaluation.linear_probe import (
    LinearProbeConvergenceWarning,
    LinearProbeGridWarning,
    _choose_c,
    _stop_reason,
    class_count_ratio,
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
    top = max(point["val_top1"] for point in curve)
    tied = [point for point in curve if point["val_top1"] == top]
    assert result["best_c"] == min(tied, key=lambda point: point["val_loss"])["c"]
    assert result["num_fit"] + result["num_val"] == 300 and result["num_val"] == 60
    assert result["top1"] > 60.0 and 0.0 <= result["mean_per_class_accuracy"] <= 100.0
    fixed = linear_probe(train_x, train_y, test_x, test_y, options=LinearProbeOptions(c=0.1))
    assert fixed["best_c"] == 0.1 and fixed["validation_curve"] == []
    # Narrow integer labels choose and score alike (the C search's cross-entropy once refused
    # them).
    for dtype in (torch.int32, torch.int16, torch.uint8):
        narrow = linear_probe(
            train_x, train_y.to(dtype), test_x, test_y.to(dtype),
            options=LinearProbeOptions(c_grid=grid), seed=0,
        )  # fmt: skip
        assert narrow["best_c"] == result["best_c"] and narrow["top1"] == result["top1"], dtype


def test_bad_inputs_are_refused() -> None:
    x, y = blobs(20, 3, 2, spread=1.0, seed=0)
    with pytest.raises(ValueError, match="C values must be finite and > 0"):
        linear_probe(x, y, x, y, options=LinearProbeOptions(c_grid=(0.0,)))
    with pytest.raises(ValueError, match="val_fraction"):
        linear_probe(x, y, x, y, options=LinearProbeOptions(val_fraction=1.0))
    with pytest.raises(ValueError, match="train and test images"):
        linear_probe(x[:0], y[:0], x, y)


def two_class_imbalanced(
    majority: int, minority: int, *, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 1 shifted by 2 along the first axis of 4 standard normal features."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.zeros(majority), torch.ones(minority)]).long()
    features = torch.randn(len(labels), 4, generator=g)
    features[:, 0] += 2.0 * labels
    return features, labels


def test_a_fit_stopped_by_its_budget_is_not_converged() -> None:
    x, y = blobs(300, 8, 4, spread=2.0, seed=3)
    (x,) = standardize(x)
    short = fit_logistic_regression(x, y, c=10.0, max_iter=3)
    assert not short.converged and short.stop_reason == "max_iter" and short.grad_max > 1e-6
    full = fit_logistic_regression(x, y, c=10.0)
    assert full.converged and full.stop_reason in ("gradient_tolerance", "no_progress")
    # Running out of function evaluations before max_iter used to count as converged: badly
    # scaled features make the line search spend the 2·max_iter evaluations in 2 iterations.
    g = torch.Generator().manual_seed(0)
    scaled = torch.randn(200, 5, generator=g) * torch.tensor([1e3, 1.0, 1e-2, 10.0, 1.0])
    labels = torch.randint(0, 3, (200,), generator=g)
    starved = fit_logistic_regression(scaled, labels, c=1.0, max_iter=3)
    assert starved.stop_reason == "max_eval" and starved.evaluations >= 6
    assert starved.iterations < 3 and not starved.converged
    budget = {"tolerance": 1e-6, "max_iter": 100, "max_eval": 200}
    assert _stop_reason(grad_max=1e-3, iterations=40, evaluations=200, **budget) == "max_eval"
    assert _stop_reason(grad_max=1e-3, iterations=100, evaluations=150, **budget) == "max_iter"
    assert _stop_reason(grad_max=1e-7, iterations=100, evaluations=200, **budget) == (
        "gradient_tolerance"
    )
    assert _stop_reason(grad_max=1e-3, iterations=40, evaluations=60, **budget) == "no_progress"


def test_non_convergence_is_warned_about_with_c_iterations_and_grid_count() -> None:
    x, y = blobs(300, 8, 4, spread=2.0, seed=3)
    grid = (0.1, 10.0)
    with pytest.warns(LinearProbeConvergenceWarning) as caught:
        result = linear_probe(
            x, y, x, y, options=LinearProbeOptions(c_grid=grid, max_iter=2), seed=0
        )
    (message,) = [str(w.message) for w in caught if w.category is LinearProbeConvergenceWarning]
    assert f"C={result['best_c']:g}" in message and "after 2 iterations" in message
    assert "2 of 2 validation-grid fits did not converge" in message and "max_iter" in message
    assert result["refit_converged"] is False and result["refit_stop_reason"] == "max_iter"
    assert result["grid_fits_not_converged"] == 2 and message in result["warnings"]
    # A converged probe is silent about convergence.
    with warnings.catch_warnings():
        warnings.simplefilter("error", LinearProbeConvergenceWarning)
        quiet = linear_probe(x, y, x, y, options=LinearProbeOptions(c=1.0))
    assert quiet["refit_converged"] and not quiet["warnings"]


def test_imbalanced_training_labels_choose_c_on_mean_per_class_accuracy() -> None:
    # 400 vs 20 images: validation top-1 is highest (95.2 %) for C so small that the minority is
    # never predicted; mean per-class accuracy prefers a C that finds it.
    train_x, train_y = two_class_imbalanced(400, 20, seed=0)
    test_x, test_y = two_class_imbalanced(200, 200, seed=100)
    grid = (1e-4, 1e-2, 1.0, 100.0)
    result = linear_probe(
        train_x, train_y, test_x, test_y, options=LinearProbeOptions(c_grid=grid), seed=0
    )
    assert result["imbalanced"] is True and result["class_count_ratio"] == 20.0
    assert result["selection_metric"] == "mean_per_class_accuracy"
    curve = result["validation_curve"]
    best_top1_c = max(curve, key=lambda point: point["val_top1"])["c"]
    chosen = next(point for point in curve if point["c"] == result["best_c"])
    by_top1 = next(point for point in curve if point["c"] == best_top1_c)
    assert chosen["val_mean_per_class_accuracy"] == max(
        point["val_mean_per_class_accuracy"] for point in curve
    )
    assert chosen["val_mean_per_class_accuracy"] > by_top1["val_mean_per_class_accuracy"]
    top1_choice = linear_probe(
        train_x, train_y, test_x, test_y, options=LinearProbeOptions(c=best_top1_c)
    )
    assert result["mean_per_class_accuracy"] > top1_choice["mean_per_class_accuracy"]
    # Balanced labels keep top-1; a fixed C records the imbalance but chose nothing.
    x, y = blobs(300, 8, 3, spread=1.5, seed=2)
    balanced = linear_probe(x, y, x, y, options=LinearProbeOptions(c_grid=(0.1, 1.0)))
    assert balanced["imbalanced"] is False and balanced["selection_metric"] == "top1"
    assert top1_choice["selection_metric"] is None and top1_choice["imbalanced"] is True


def test_class_count_ratio_ignores_absent_classes() -> None:
    assert class_count_ratio(torch.tensor([0, 0, 0, 0, 2, 2])) == 2.0
    assert class_count_ratio(torch.tensor([3, 3, 1, 1])) == 1.0
    with pytest.raises(ValueError, match="imbalance_ratio"):
        LinearProbeOptions(imbalance_ratio=0.5).validate()


def test_ties_go_to_the_lowest_validation_loss_then_the_smaller_c() -> None:
    curve = [
        {"c": 0.01, "val_top1": 90.0, "val_loss": 0.9},
        {"c": 0.1, "val_top1": 90.0, "val_loss": 0.5},
        {"c": 1.0, "val_top1": 90.0, "val_loss": 0.7},
        {"c": 10.0, "val_top1": 80.0, "val_loss": 0.1},
    ]
    assert _choose_c(curve, "val_top1", "val_loss") == 1
    curve[2]["val_loss"] = 0.5
    assert _choose_c(curve, "val_top1", "val_loss") == 1


def test_probe_breaks_accuracy_ties_by_validation_loss() -> None:
    # Four overlapping classes in 16 dimensions: validation top-1 ties at the three smallest C.
    g = torch.Generator().manual_seed(2)
    train_y = torch.arange(4).repeat_interleave(50)
    train_x = 2.0 * torch.eye(16)[train_y] + torch.randn(200, 16, generator=g)
    grid = (1e-4, 1e-3, 1e-2, 1e-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LinearProbeGridWarning)  # the choice is inside the grid
        result = linear_probe(
            train_x, train_y, train_x, train_y, options=LinearProbeOptions(c_grid=grid)
        )
    curve = result["validation_curve"]
    best = max(point["val_top1"] for point in curve)
    tied = [point for point in curve if point["val_top1"] == best]
    assert len(tied) >= 2, "the data must produce a tie for this test to mean anything"
    assert result["best_c"] == min(tied, key=lambda point: point["val_loss"])["c"]
    assert result["best_c"] != min(point["c"] for point in tied)


def test_a_c_on_the_edge_of_the_grid_is_warned_about() -> None:
    # Separable classes: every C is perfect on validation and the loss keeps falling with C.
    x, y = blobs(200, 6, 2, spread=0.05, seed=4)
    with pytest.warns(LinearProbeGridWarning, match=r"C=0\.01 is the largest value.*widen"):
        result = linear_probe(x, y, x, y, options=LinearProbeOptions(c_grid=(1e-4, 1e-3, 1e-2)))
    assert result["c_at_grid_edge"] == "largest" and result["best_c"] == 0.01
    assert any("largest" in text for text in result["warnings"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", LinearProbeGridWarning)
        fixed = linear_probe(x, y, x, y, options=LinearProbeOptions(c=1e-2))
        single = linear_probe(x, y, x, y, options=LinearProbeOptions(c_grid=(1e-2,)))
    assert fixed["c_at_grid_edge"] is None and single["c_at_grid_edge"] is None
    assert result["grid_edge_warned"] and not fixed["grid_edge_warned"]
    # A deliberately narrow grid (a smoke run): recorded, not warned about.
    with warnings.catch_warnings():
        warnings.simplefilter("error", LinearProbeGridWarning)
        quiet = linear_probe(
            x, y, x, y, options=LinearProbeOptions(c_grid=(1e-4, 1e-3, 1e-2), warn_grid_edge=False)
        )
    assert quiet["c_at_grid_edge"] == "largest" and not quiet["grid_edge_warned"]
