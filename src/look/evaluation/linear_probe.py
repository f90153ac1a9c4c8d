"""Linear probe: multinomial logistic regression on standardised frozen features, fitted in torch.

The objective is scikit-learn's, so ``C`` means the same thing there and here::

    mean_i CE(W x_i + b, y_i) + ||W||² / (2 C n)      (≡ C·Σ_i CE + ½||W||², intercept unpenalised)

It is minimised full-batch with ``torch.optim.LBFGS`` (strong-Wolfe line search); the loss and its
gradient are accumulated over row chunks, so 1.28M × 2048 float32 features fit on one GPU. ``C`` is
chosen on a seeded stratified validation split carved from the training set, then the model is
refitted on the whole training set with the best ``C``.

``C`` is chosen on validation top-1, or on validation mean per-class accuracy when the training
labels are imbalanced (largest over smallest class count above ``imbalance_ratio``, 2 by default:
ImageNet's 1300/732 is balanced, a long-tailed set is not), as the protocol reports mean per-class
accuracy there. Ties go to the lowest validation cross-entropy. A fit that ran out of iterations or
function evaluations, and a ``C`` on the edge of its grid, are warned about and recorded.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from look.data.sources import class_members
from look.evaluation.metrics import (
    check_labelled_features,
    check_same_feature_dim,
    mean_per_class_accuracy,
    top1_accuracy,
)
from look.search import autocast_disabled

__all__ = [
    "DEFAULT_C_GRID",
    "DEFAULT_IMBALANCE_RATIO",
    "LinearProbeConvergenceWarning",
    "LinearProbeGridWarning",
    "LinearProbeOptions",
    "LogisticRegressionFit",
    "class_count_ratio",
    "fit_logistic_regression",
    "linear_probe",
    "predict_logistic_regression",
    "standardize",
    "stratified_validation_split",
]

# 10^-4 ... 10^2, 7 log-spaced values.
DEFAULT_C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 2, 7))
_CHUNK_ROWS = 65536
# Largest/smallest training class count above which C is chosen on mean per-class accuracy.
DEFAULT_IMBALANCE_RATIO = 2.0
# Why L-BFGS stopped; only the first two mean the optimum was reached (to float32 precision).
_CONVERGED_STOPS = ("gradient_tolerance", "no_progress")


class LinearProbeConvergenceWarning(UserWarning):
    """An L-BFGS fit of the linear probe stopped on its iteration or evaluation budget."""


class LinearProbeGridWarning(UserWarning):
    """The chosen C is the smallest or largest value of the grid searched."""


@dataclass(frozen=True)
class LinearProbeOptions:
    """Settings of :func:`linear_probe`.

    ``c`` fixes the inverse L2 strength and skips the search over ``c_grid``; ``val_fraction`` of
    every class's training images form the validation split. L-BFGS stops after ``max_iter``
    iterations (``2·max_iter`` function evaluations) or when the largest gradient entry falls below
    ``tolerance``. Training labels whose largest/smallest class count exceeds ``imbalance_ratio``
    are imbalanced: C is then chosen on validation mean per-class accuracy. ``warn_grid_edge=False``
    does not warn about a C chosen at an end of the grid, for a caller that searches a narrow grid
    on purpose (a smoke run); the result still records ``c_at_grid_edge``, and that it was not
    warned about (``grid_edge_warned``).
    """

    c_grid: tuple[float, ...] = DEFAULT_C_GRID
    c: float | None = None
    val_fraction: float = 0.2
    max_iter: int = 1000
    tolerance: float = 1e-6
    history_size: int = 10
    imbalance_ratio: float = DEFAULT_IMBALANCE_RATIO
    warn_grid_edge: bool = True

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
        if not (math.isfinite(self.imbalance_ratio) and self.imbalance_ratio >= 1.0):
            raise ValueError(f"imbalance_ratio={self.imbalance_ratio} must be finite and >= 1")


@dataclass(eq=False)
class LogisticRegressionFit:
    """Weights ``(K, d)`` and intercepts ``(K,)`` of a fitted model, and how the solver ended.

    ``stop_reason``: ``"gradient_tolerance"`` (largest gradient entry <= tolerance),
    ``"no_progress"`` (loss change, step or descent below float precision), ``"max_iter"`` or
    ``"max_eval"`` (budget spent); ``converged`` is True for the first two only.
    """

    weight: Tensor
    bias: Tensor
    iterations: int
    converged: bool
    loss: float
    stop_reason: str = "gradient_tolerance"
    evaluations: int = 0
    grad_max: float = 0.0
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
    each_class = class_members(label_array)
    for cls in np.unique(label_array):
        members = each_class[cls]
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


def class_count_ratio(labels: Tensor) -> float:
    """Largest over smallest image count among the classes present in ``labels`` (1 = balanced)."""
    counts = torch.bincount(labels.detach().cpu().to(torch.int64))
    counts = counts[counts > 0]
    return float(counts.max()) / float(counts.min())


def _stop_reason(
    *,
    grad_max: float,
    iterations: int,
    evaluations: int,
    tolerance: float,
    max_iter: int,
    max_eval: int,
) -> str:
    """Why ``torch.optim.LBFGS.step`` returned, read from its final state.

    torch does not say; its loop tests the budgets before the tolerances, so a fit at the
    gradient tolerance is judged by its final gradient first, then a spent budget is a failure,
    and any other stop is one of its progress tests (loss change, step, directional derivative).
    """
    if grad_max <= tolerance:
        return "gradient_tolerance"
    if iterations >= max_iter:
        return "max_iter"
    if evaluations >= max_eval:
        return "max_eval"
    return "no_progress"


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
    the C grid). ``converged`` is True when L-BFGS stopped on its gradient tolerance or for lack of
    progress, False when it spent its ``max_iter`` iterations or ``2·max_iter`` evaluations.
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
    max_eval = 2 * max_iter
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_eval,
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
    assert weight.grad is not None and bias.grad is not None
    grad_max = max(float(weight.grad.abs().max()), float(bias.grad.abs().max()))
    state = optimizer.state[weight]
    iterations = int(state.get("n_iter", 0))
    stop = _stop_reason(
        grad_max=grad_max,
        iterations=iterations,
        evaluations=int(state.get("func_evals", 0)),
        tolerance=tolerance,
        max_iter=max_iter,
        max_eval=max_eval,
    )
    return LogisticRegressionFit(
        weight=weight.detach(),
        bias=bias.detach(),
        iterations=iterations,
        converged=stop in _CONVERGED_STOPS,
        loss=final_loss,
        stop_reason=stop,
        evaluations=int(state.get("func_evals", 0)),
        grad_max=grad_max,
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


@torch.no_grad()
def _validation_losses(
    fit: LogisticRegressionFit, features: Tensor, labels: Tensor
) -> tuple[float, float]:
    """Mean cross-entropy of ``fit`` over the images, and its mean over the classes present."""
    weight, bias = fit.weight.to(features.device), fit.bias.to(features.device)
    losses = torch.cat(
        [
            F.cross_entropy(torch.addmm(bias, x.float(), weight.T), y, reduction="none")
            for x, y in zip(features.split(_CHUNK_ROWS), labels.split(_CHUNK_ROWS), strict=True)
        ]
    ).double()
    classes, inverse = torch.unique(labels, return_inverse=True)
    per_class = torch.zeros(len(classes), dtype=torch.float64, device=losses.device)
    per_class.index_add_(0, inverse, losses)
    per_class /= torch.bincount(inverse, minlength=len(classes)).double()
    return float(losses.mean()), float(per_class.mean())


def _choose_c(curve: list[dict[str, Any]], metric: str, loss: str) -> int:
    """Index of the chosen point of ``curve``: best ``metric``, ties to the lowest ``loss``.

    Validation accuracy counts images, so neighbouring C often tie exactly (an easy set ties
    everywhere). The smallest tied C would always pick the most regularised model, however
    underfitted, and the middle of the tied range depends on where the grid happens to end; the
    held-out cross-entropy measures the same fit smoothly, so it picks the tied C whose
    probabilities generalise best. Exact loss ties go to the smaller C.
    """
    best = max(point[metric] for point in curve)
    tied = [i for i, point in enumerate(curve) if math.isclose(point[metric], best, abs_tol=1e-9)]
    return min(tied, key=lambda i: (curve[i][loss], curve[i]["c"]))


def _convergence_message(
    final: LogisticRegressionFit,
    c: float,
    curve: list[dict[str, Any]],
    *,
    max_iter: int,
    tolerance: float,
) -> str | None:
    """The warning text when the refit or some grid fit ran out of budget, else None."""
    failed = [point["c"] for point in curve if not point["converged"]]
    if final.converged and not failed:
        return None
    if final.converged:
        head = (
            f"linear probe: the refit with C={c:g} converged ({final.iterations} iterations), but"
        )
    else:
        head = (
            f"linear probe did not converge: the refit on the whole training set with C={c:g} "
            f"stopped on {final.stop_reason} after {final.iterations} iterations "
            f"({final.evaluations} function evaluations) with its largest gradient entry at "
            f"{final.grad_max:.2e} > tolerance {tolerance:g};"
        )
    grid = ""
    if curve:
        listed = ", ".join(f"{value:g}" for value in failed)
        grid = f" {len(failed)} of {len(curve)} validation-grid fits did not converge" + (
            f" (C={listed})" if failed else ""
        )
    return (
        f"{head}{grid}; the probe's accuracy may fall short of its optimum: raise max_iter "
        f"(look evaluate --linear-max-iter, now {max_iter})"
    )


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
    the split while choosing C, the whole training set for the refit). C is chosen on validation
    top-1, or on validation mean per-class accuracy when the training labels are imbalanced
    (:func:`class_count_ratio` above ``options.imbalance_ratio``); ties go to the lowest
    validation cross-entropy (class-balanced when imbalanced). Warns
    (:class:`LinearProbeConvergenceWarning`) when a fit spent its iteration budget and
    (:class:`LinearProbeGridWarning`) when the chosen C is an end of the grid.

    Returns a JSON-ready dict with ``top1``, ``mean_per_class_accuracy``, ``best_c``,
    ``selection_metric``, ``imbalanced``, ``class_count_ratio``, ``c_at_grid_edge``,
    ``refit_converged``, the ``validation_curve`` and the ``warnings`` issued (their text).
    """
    options = options or LinearProbeOptions()
    options.validate()
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError(
            f"linear probe needs train and test images, got {len(train_features)} and "
            f"{len(test_features)}"
        )
    check_labelled_features(train_features, train_labels, "train", num_classes)
    check_labelled_features(test_features, test_labels, "test", num_classes)
    check_same_feature_dim(train_features, test_features)
    # (cross-entropy takes int64 targets only: narrower labels, int32 say, are widened here)
    train_labels, test_labels = train_labels.long(), test_labels.long()
    device = torch.device(device)
    classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    train_x, train_y = train_features.to(device, torch.float32), train_labels.to(device)
    solver = {
        "max_iter": options.max_iter,
        "tolerance": options.tolerance,
        "history_size": options.history_size,
    }
    ratio = class_count_ratio(train_labels)
    imbalanced = ratio > options.imbalance_ratio
    # The protocol reports mean per-class accuracy on imbalanced sets: choose C on the same.
    selection_metric = "mean_per_class_accuracy" if imbalanced else "top1"

    curve: list[dict[str, Any]] = []
    warm: LogisticRegressionFit | None = None
    edge: str | None = None
    classes_without_val = 0
    if options.c is None:
        fit_idx, val_idx = stratified_validation_split(
            train_labels, options.val_fraction, seed=seed
        )
        classes_without_val = int(
            len(torch.unique(train_labels)) - len(torch.unique(train_labels[val_idx]))
        )
        fit_idx, val_idx = fit_idx.to(device), val_idx.to(device)
        fit_x, val_x = standardize(train_x[fit_idx], train_x[val_idx])
        fit_y, val_y = train_y[fit_idx], train_y[val_idx]
        fits: list[LogisticRegressionFit] = []
        # Ascending C: each fit warm-starts from the more regularised (faster) previous one.
        for c in sorted(options.c_grid):
            warm = fit_logistic_regression(
                fit_x, fit_y, c=c, num_classes=classes, init=warm, **solver
            )
            fits.append(warm)
            predictions = predict_logistic_regression(warm, val_x)
            val_loss, val_balanced_loss = _validation_losses(warm, val_x, val_y)
            curve.append(
                {
                    "c": c,
                    "val_top1": top1_accuracy(predictions, val_y),
                    "val_mean_per_class_accuracy": mean_per_class_accuracy(predictions, val_y),
                    "val_loss": val_loss,
                    "val_class_balanced_loss": val_balanced_loss,
                    "iterations": warm.iterations,
                    "converged": warm.converged,
                    "stop_reason": warm.stop_reason,
                }
            )
        chosen = _choose_c(
            curve,
            f"val_{selection_metric}",
            "val_class_balanced_loss" if imbalanced else "val_loss",
        )
        best_c, warm = curve[chosen]["c"], fits[chosen]
        if len(curve) > 1 and chosen in (0, len(curve) - 1):
            edge = "smallest" if chosen == 0 else "largest"
        num_fit, num_val = len(fit_idx), len(val_idx)
        del fit_x, val_x, fits  # large on ImageNet-sized sets: free them before the refit
    else:
        best_c, num_fit, num_val = options.c, len(train_x), 0

    all_x, test_x = standardize(train_x, test_features.to(device, torch.float32))
    final = fit_logistic_regression(
        all_x, train_y, c=best_c, num_classes=classes, init=warm, **solver
    )
    predictions = predict_logistic_regression(final, test_x)
    test_y = test_labels.to(device)

    issued: list[str] = []
    message = _convergence_message(
        final, best_c, curve, max_iter=options.max_iter, tolerance=options.tolerance
    )
    if message is not None:
        warnings.warn(message, LinearProbeConvergenceWarning, stacklevel=2)
        issued.append(message)
    if edge is not None and options.warn_grid_edge:
        grid = sorted(options.c_grid)
        message = (
            f"linear probe: the chosen C={best_c:g} is the {edge} value of the grid searched "
            f"({grid[0]:g} ... {grid[-1]:g}), so the best C may lie beyond it: widen the grid "
            "(look evaluate --linear-c-grid)"
        )
        warnings.warn(message, LinearProbeGridWarning, stacklevel=2)
        issued.append(message)
    return {
        "classifier": (
            "multinomial logistic regression on standardised features, L-BFGS (strong Wolfe), "
            "objective mean CE + ||W||^2/(2 C n) as scikit-learn"
        ),
        "top1": top1_accuracy(predictions, test_y),
        "mean_per_class_accuracy": mean_per_class_accuracy(predictions, test_y),
        "best_c": best_c,
        "c_selection": "fixed" if options.c is not None else "validation split of train",
        "selection_metric": selection_metric if options.c is None else None,
        "tie_break": (
            None
            if options.c is not None
            else "lowest validation "
            + ("class-balanced " if imbalanced else "")
            + "cross-entropy, then smaller C"
        ),
        "c_at_grid_edge": edge,
        "grid_edge_warned": edge is not None and options.warn_grid_edge,
        "imbalanced": imbalanced,
        "class_count_ratio": ratio,
        "imbalance_ratio_threshold": options.imbalance_ratio,
        "classes_without_validation_images": classes_without_val,
        "val_fraction": options.val_fraction if options.c is None else None,
        "validation_curve": curve,
        "refit_iterations": final.iterations,
        "refit_converged": final.converged,
        "refit_stop_reason": final.stop_reason,
        "grid_fits_not_converged": sum(not point["converged"] for point in curve),
        "warnings": issued,
        "num_fit": num_fit,
        "num_val": num_val,
        "num_train": len(train_x),
        "num_test": len(test_x),
        "num_classes": classes,
        "feature_dim": int(train_x.shape[1]),
        "max_iter": options.max_iter,
        "tolerance": options.tolerance,
    }
