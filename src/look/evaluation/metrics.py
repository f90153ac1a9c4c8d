"""Accuracy metrics shared by the transfer protocols. Accuracies are in percent (0–100)."""

from __future__ import annotations

import torch
from torch import Tensor

from look.data.sources import name_some


def _check_pair(predictions: Tensor, targets: Tensor) -> None:
    if predictions.ndim != 1 or targets.ndim != 1 or predictions.shape != targets.shape:
        raise ValueError(
            "predictions and targets must be 1-D tensors of the same length, got shapes "
            f"{tuple(predictions.shape)} and {tuple(targets.shape)}"
        )
    if targets.numel() == 0:
        raise ValueError("cannot compute an accuracy over zero samples (the split is empty)")


def top1_accuracy(predictions: Tensor, targets: Tensor) -> float:
    """Percentage of ``predictions`` equal to ``targets`` (both integer class indices)."""
    _check_pair(predictions, targets)
    return 100.0 * (predictions.cpu() == targets.cpu()).double().mean().item()


def per_class_accuracy(predictions: Tensor, targets: Tensor) -> dict[int, float]:
    """Recall of every class present in ``targets``, in percent, keyed by class index."""
    _check_pair(predictions, targets)
    predictions, targets = predictions.cpu(), targets.cpu()
    classes = torch.unique(targets)
    return {
        int(c): 100.0 * (predictions[targets == c] == c).double().mean().item() for c in classes
    }


def mean_per_class_accuracy(predictions: Tensor, targets: Tensor) -> float:
    """Mean over the classes present in ``targets`` of each class's accuracy, in percent.

    Equals top-1 accuracy on a balanced test set; on an imbalanced one every class counts equally.
    """
    recalls = per_class_accuracy(predictions, targets)
    return sum(recalls.values()) / len(recalls)


def check_labelled_features(
    features: Tensor, labels: Tensor, split: str, num_classes: int | None = None
) -> None:
    """Refuse features a protocol would turn into a plausible but meaningless accuracy: not a
    (N, D) matrix, labels not N class indices in ``[0, num_classes)`` (non-negative when
    ``num_classes`` is None: a label past the classes would be scored as always wrong), or a
    non-finite value (a NaN row is every query's nearest neighbour in kNN, and L-BFGS fails on
    it with an unrelated message)."""
    check_features(features, split)
    if labels.ndim != 1 or len(labels) != len(features):
        raise ValueError(
            f"{split} labels must be one class index per feature row: {len(features)} rows, "
            f"labels of shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{split} labels must be integer class indices, got {labels.dtype}")
    if len(labels) and int(labels.min()) < 0:
        raise ValueError(f"{split} labels must be >= 0, got {int(labels.min())}")
    if num_classes is not None and len(labels) and int(labels.max()) >= num_classes:
        raise ValueError(
            f"{split} labels must be class indices below num_classes={num_classes}, got "
            f"{int(labels.max())}"
        )


def check_features(features: Tensor, split: str) -> None:
    """Refuse features that are not an (N, D) matrix or hold a non-finite value (the part of
    :func:`check_labelled_features` that needs no labels: a kNN's queries)."""
    if features.ndim != 2:
        raise ValueError(f"{split} features must be (N, D), got shape {tuple(features.shape)}")
    finite = torch.isfinite(features).all(dim=1)
    if not bool(finite.all()):
        rows = (~finite).nonzero().squeeze(1).tolist()
        shown = name_some([str(row) for row in rows], quote=False)
        raise ValueError(f"{split} features hold NaN or Inf in {len(rows)} row(s): {shown}")


def check_same_feature_dim(train: Tensor, test: Tensor) -> None:
    if train.shape[1] != test.shape[1]:
        raise ValueError(
            f"train and test features differ in dimension: {train.shape[1]} vs {test.shape[1]}"
        )
