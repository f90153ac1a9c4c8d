"""Weighted k-nearest-neighbour classification on frozen features (Wu et al., 2018).

The L2-normalised training features are the memory and the test features the queries. Each of
the ``k`` most cosine-similar training images votes for its label with weight ``exp(s / τ)``; the
class with the largest total wins. Neighbours come from :func:`look.search.knn_search`, chunked
over the memory and over the queries, so no test × train matrix is ever built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from look.evaluation.metrics import (
    check_features,
    check_labelled_features,
    check_same_feature_dim,
    mean_per_class_accuracy,
    top1_accuracy,
)
from look.search import check_positive_int, knn_search

__all__ = ["KnnOptions", "knn_classify", "knn_predict"]

_QUERY_CHUNK = 1024
_MEMORY_CHUNK = 65536


@dataclass(frozen=True)
class KnnOptions:
    """Neighbour counts ``ks`` and the vote temperature ``temperature`` (τ)."""

    ks: tuple[int, ...] = (20, 200)
    temperature: float = 0.07

    def validate(self) -> None:
        if isinstance(self.ks, int) or not self.ks:
            raise ValueError(
                f"ks must be a non-empty tuple of ints, e.g. (20, 200), got {self.ks!r}"
            )
        for k in self.ks:
            check_positive_int(k, "k")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"kNN temperature={self.temperature} must be finite and > 0")


@torch.no_grad()
def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    ks: Sequence[int],
    *,
    temperature: float = 0.07,
    num_classes: int | None = None,
    device: torch.device | str = "cpu",
) -> dict[int, Tensor]:
    """Weighted-kNN predictions ``(num_test,)`` for each ``k`` in ``ks`` (cosine, weight exp(s/τ)).

    ``k`` larger than the training set is clipped to its size (the key stays the requested ``k``).
    The inputs are checked as :func:`knn_classify` checks them (``ValueError``).
    """
    KnnOptions(ks if isinstance(ks, int) else tuple(ks), temperature).validate()
    if len(train_features) == 0:
        raise ValueError("kNN needs at least one training image in the memory")
    check_labelled_features(train_features, train_labels, "train", num_classes)
    check_features(test_features, "test")
    check_same_feature_dim(train_features, test_features)
    return _weighted_votes(
        train_features, train_labels, test_features, tuple(ks),
        temperature=temperature, num_classes=num_classes, device=device,
    )  # fmt: skip


def _weighted_votes(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    ks: tuple[int, ...],
    *,
    temperature: float,
    num_classes: int | None,
    device: torch.device | str,
) -> dict[int, Tensor]:
    """:func:`knn_predict` on checked inputs."""
    device = torch.device(device)
    memory = F.normalize(train_features.to(device, torch.float32), dim=1)
    memory_labels = train_labels.to(device, torch.int64)
    classes = num_classes or int(memory_labels.max()) + 1
    largest_k = min(max(ks), len(memory))
    predictions: dict[int, list[Tensor]] = {k: [] for k in ks}
    for queries in test_features.split(_QUERY_CHUNK):
        queries = F.normalize(queries.to(device, torch.float32), dim=1)
        # (the features were checked finite once, by the caller)
        result = knn_search(
            queries, memory, largest_k, chunk_size=_MEMORY_CHUNK, check_finite=False
        )
        neighbour_labels = memory_labels[result.indices]  # indices are never -1: k <= N
        for k in ks:
            used = min(k, len(memory))
            similarities = result.values[:, :used]
            # Subtracting the row maximum leaves the argmax unchanged and keeps exp() finite.
            weights = torch.exp((similarities - similarities[:, :1]) / temperature)
            votes = torch.zeros(len(queries), classes, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :used], weights)
            predictions[k].append(votes.argmax(dim=1).cpu())
    return {
        k: torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
        for k, parts in predictions.items()
    }


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    options: KnnOptions | None = None,
    device: torch.device | str = "cpu",
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Test accuracy (percent) of weighted kNN for every ``k``; a JSON-ready dict."""
    options = options or KnnOptions()
    options.validate()
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError(
            f"kNN needs train and test images, got {len(train_features)} and {len(test_features)}"
        )
    check_labelled_features(train_features, train_labels, "train", num_classes)
    check_labelled_features(test_features, test_labels, "test", num_classes)
    check_same_feature_dim(train_features, test_features)
    classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    predictions = _weighted_votes(
        train_features,
        train_labels,
        test_features,
        tuple(options.ks),
        temperature=options.temperature,
        num_classes=classes,
        device=device,
    )
    results = []
    for k in options.ks:
        results.append(
            {
                "k": k,
                "k_effective": min(k, len(train_features)),
                "top1": top1_accuracy(predictions[k], test_labels),
                "mean_per_class_accuracy": mean_per_class_accuracy(predictions[k], test_labels),
            }
        )
    return {
        "classifier": "weighted kNN, cosine similarity, votes weighted by exp(sim / temperature)",
        "memory": "L2-normalised train features",
        "temperature": options.temperature,
        "results": results,
        "num_train": len(train_features),
        "num_test": len(test_features),
    }
