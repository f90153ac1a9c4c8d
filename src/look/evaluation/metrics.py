"""Accuracy metrics shared by the transfer protocols. Accuracies are in percent (0–100)."""

from __future__ import annotations

import torch
from torch import Tensor


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
