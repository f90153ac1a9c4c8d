"""Linear probe: multinomial logistic regression on standardised frozen features, fitted in torch.

The objective is scikit-learn's, so ``C`` means the same thing there and here::

    mean_i CE(W x_i + b, y_i) + ||W||² / (2 C n)      (≡ C·Σ_i CE + ½||W||², intercept unpenalised)

It is minimised full-batch with ``torch.optim.LBFGS`` (strong-Wolfe line search); the loss and its
gradient are accumulated over row chunks, so 1.28M × 2048 float32 features fit on one GPU. ``C`` is
chosen on a seeded stratified validation split carved from the training set, then the model is
refitted on the whole training set with the best ``C``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from look.evaluation.metrics import (
    check_labelled_features,
    check_same_feature_dim,
    mean_per_class_accuracy,
    top1_accuracy,
)
from look.search import autocast_disabled

__all__ = [
    "DEFAULT_C_GRID",
    "LinearProbeOptions",
    "LogisticRegressionFit",
    "fit_logistic_regression",
    "linear_probe",
    "predict_logistic_regression",
    "standardize",
    "stratified_validation_split",
]

# 10^-4 ... 10^2, 7 log-spaced values.
DEFAULT_C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 2, 7))
_CHUNK_ROWS = 65536


@dataclass(frozen=True)
class LinearProbeOptions:
    """Settings of :func:`linear_probe`.

    ``c`` fixes the inverse L2 strength and skips the search over ``c_grid``; ``val_fraction`` of
    every class's training images form the validation split. L-BFGS stops after ``max_iter``
    iterations or when the largest gradient entry falls below ``tolerance``.
    """

    c_grid: tuple[float, ...] = DEFAULT_C_GRID
    c: float | None = None
    val_fraction: float = 0.2
    max_iter: int = 1000
    tolerance: float = 1e-6
    history_size: int = 10

    def validate(self) -> None:
        grid = (self.c,) if self.c is not None else self.c_grid
        if not grid or any(not (math.isfinite(c) and c > 0) for c in grid):
            raise ValueError(f"C values must be finite and > 0, got {list(grid)}")
        if self.c is None and not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must lie strictly between 0 and 1")
        if self.max_iter < 1:
            raise ValueError(f"max_iter={self.max_iter} must be at least 1")
        if not self.tolerance > 0:
            raise ValueError(f"tolerance={self.tolerance} must be > 0")
        if self.history_size < 1:
            raise ValueError(f"history_size={self.history_size} must be at least 1")


@dataclass(eq=False)
class LogisticRegressionFit:
    """Weights ``(K, d)`` and intercepts ``(K,)`` of a fitted model, and how the solver ended."""

    weight: Tensor
    bias: Tensor
    iterations: int
    converged: bool
    loss: float
    extra: dict[str, Any] = field(default_factory=dict)


def standardize(train: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """Centre and scale every tensor by ``train``'s per-column mean and (population) std.

    Constant columns get a scale of 1 (as scikit-learn's ``StandardScaler``).
    """
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, unbiased=False, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple((t - mean) / std for t in (train, *others))


def stratified_validation_split(
    labels: Tensor, fraction: float, *, seed: int
) -> tuple[Tensor, Tensor]:
    """Sorted ``(fit_indices, val_indices)``: ``round(fraction·n_c)`` images of each class to val.

    Every class with at least two images keeps one on each side; a class with a single image stays
    in the fitting part. Which images is drawn from a numpy generator seeded with ``seed``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction {fraction} must lie strictly between 0 and 1")
    label_array = labels.cpu().numpy()
    rng = np.random.default_rng(seed)
    val_parts = []
    for cls in np.unique(label_array):
        members = np.flatnonzero(label_array == cls)
        if len(members) < 2:
            continue
        count = min(max(round(fraction * len(members)), 1), len(members) - 1)
        val_parts.append(rng.choice(members, size=count, replace=False))
    if not val_parts:
        raise ValueError(
            "no class has two training images, so no validation split can be carved to choose C; "
            "pass a fixed C instead"
        )
    val = np.sort(np.concatenate(val_parts))
    fit = np.setdiff1d(np.arange(len(label_array)), val)
    return torch.from_numpy(fit), torch.from_numpy(val)


def fit_logistic_regression(
    features: Tensor,
    labels: Tensor,
    *,
    c: float,
    num_classes: int | None = None,
    max_iter: int = 1000,
    tolerance: float = 1e-6,
    history_size: int = 10,
    init: LogisticRegressionFit | None = None,
) -> LogisticRegressionFit:
    """Minimise ``mean CE + ||W||²/(2 c n)`` over ``W (K, d)``, ``b (K,)`` with full-batch L-BFGS.

    Runs on ``features``' device in float32. ``init`` warm-starts from a previous fit (used along
    the C grid). ``converged`` is False when the solver used all ``max_iter`` iterations.
    """
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
        raise ValueError(
            f"need features (n, d) and labels (n,), got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if len(features) == 0:
        raise ValueError("cannot fit a linear probe on zero training images")
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"C={c} must be finite and > 0")
    device = features.device
    x = features.float()
    y = labels.to(device=device, dtype=torch.int64)
    n, dim = x.shape
    classes = int(num_classes) if num_classes is not None else int(y.max()) + 1
    if int(y.max()) >= classes or int(y.min()) < 0:
        raise ValueError(
            f"labels must lie in [0, {classes}), found [{int(y.min())}, {int(y.max())}]"
        )
    if init is not None:
        weight = init.weight.detach().to(device, torch.float32).clone().requires_grad_(True)
        bias = init.bias.detach().to(device, torch.float32).clone().requires_grad_(True)
    else:
        weight = torch.zeros(classes, dim, device=device, requires_grad=True)
        bias = torch.zeros(classes, device=device, requires_grad=True)
    penalty_scale = 0.5 / (c * n)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=tolerance,
        tolerance_change=1e-12,
        history_size=history_size,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=False)
        total = torch.zeros((), device=device)
        # Chunked: only chunk × K logits (and their graph) exist at a time; gradients accumulate.
        for start in range(0, n, _CHUNK_ROWS):
            logits = torch.addmm(bias, x[start : start + _CHUNK_ROWS], weight.T)
            chunk_loss = (
                F.cross_entropy(logits, y[start : start + _CHUNK_ROWS], reduction="sum") / n
            )
            chunk_loss.backward()
            total += chunk_loss.detach()
        penalty = penalty_scale * weight.pow(2).sum()
        penalty.backward()
        return total + penalty.detach()

    with autocast_disabled(device):
        optimizer.step(closure)
        # step() returns the loss at its start; one more evaluation gives the final objective.
        final_loss = float(closure())
    iterations = int(optimizer.state[optimizer.param_groups[0]["params"][0]].get("n_iter", 0))
    return LogisticRegressionFit(
        weight=weight.detach(),
        bias=bias.detach(),
        iterations=iterations,
        converged=iterations < max_iter,
        loss=final_loss,
    )


@torch.no_grad()
def predict_logistic_regression(fit: LogisticRegressionFit, features: Tensor) -> Tensor:
    """Predicted class of every row of ``features`` (int64, on ``features``' device)."""
    weight, bias = fit.weight.to(features.device), fit.bias.to(features.device)
    predictions = [
        torch.addmm(bias, chunk.float(), weight.T).argmax(dim=1)
        for chunk in features.split(_CHUNK_ROWS)
    ]
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.int64)


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    options: LinearProbeOptions | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Choose C on a validation split, refit on all of train, report test accuracy (percent).

    Features are standardised with the statistics of the part being fitted (the fitting part of
    the split while choosing C, the whole training set for the refit). Returns a JSON-ready dict
    with ``top1``, ``mean_per_class_accuracy``, ``best_c`` and the ``validation_curve``.
    """
    options = options or LinearProbeOptions()
    options.validate()
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError(
            f"linear probe needs train and test images, got {len(train_features)} and "
            f"{len(test_features)}"
        )
    check_labelled_features(train_features, train_labels, "train")
    check_labelled_features(test_features, test_labels, "test")
    check_same_feature_dim(train_features, test_features)
    device = torch.device(device)
    classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    train_x, train_y = train_features.to(device, torch.float32), train_labels.to(device)
    solver = {
        "max_iter": options.max_iter,
        "tolerance": options.tolerance,
        "history_size": options.history_size,
    }

    curve: list[dict[str, Any]] = []
    warm: LogisticRegressionFit | None = None
    if options.c is None:
        fit_idx, val_idx = stratified_validation_split(
            train_labels, options.val_fraction, seed=seed
        )
        fit_idx, val_idx = fit_idx.to(device), val_idx.to(device)
        fit_x, val_x = standardize(train_x[fit_idx], train_x[val_idx])
        fit_y, val_y = train_y[fit_idx], train_y[val_idx]
        best_score, best_c, best_fit = -1.0, None, None
        # Ascending C: each fit warm-starts from the more regularised (faster) previous one.
        for c in sorted(options.c_grid):
            warm = fit_logistic_regression(
                fit_x, fit_y, c=c, num_classes=classes, init=warm, **solver
            )
            predictions = predict_logistic_regression(warm, val_x)
            val_top1 = top1_accuracy(predictions, val_y)
            curve.append(
                {
                    "c": c,
                    "val_top1": val_top1,
                    "val_mean_per_class_accuracy": mean_per_class_accuracy(predictions, val_y),
                    "iterations": warm.iterations,
                    "converged": warm.converged,
                }
            )
            if val_top1 > best_score:  # ties keep the smaller C (stronger regularisation)
                best_score, best_c, best_fit = val_top1, c, warm
        assert best_c is not None and best_fit is not None
        warm = best_fit
        num_fit, num_val = len(fit_idx), len(val_idx)
        del fit_x, val_x  # large on ImageNet-sized sets: free them before the refit
    else:
        best_c, num_fit, num_val = options.c, len(train_x), 0

    all_x, test_x = standardize(train_x, test_features.to(device, torch.float32))
    final = fit_logistic_regression(
        all_x, train_y, c=best_c, num_classes=classes, init=warm, **solver
    )
    predictions = predict_logistic_regression(final, test_x)
    test_y = test_labels.to(device)
    return {
        "classifier": (
            "multinomial logistic regression on standardised features, L-BFGS (strong Wolfe), "
            "objective mean CE + ||W||^2/(2 C n) as scikit-learn"
        ),
        "top1": top1_accuracy(predictions, test_y),
        "mean_per_class_accuracy": mean_per_class_accuracy(predictions, test_y),
        "best_c": best_c,
        "c_selection": "fixed" if options.c is not None else "validation split of train",
        "val_fraction": options.val_fraction if options.c is None else None,
        "validation_curve": curve,
        "refit_iterations": final.iterations,
        "refit_converged": final.converged,
        "num_fit": num_fit,
        "num_val": num_val,
        "num_train": len(train_x),
        "num_test": len(test_x),
        "num_classes": classes,
        "feature_dim": int(train_x.shape[1]),
        "max_iter": options.max_iter,
        "tolerance": options.tolerance,
    }
