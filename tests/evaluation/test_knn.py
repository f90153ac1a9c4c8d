from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from look.evaluation import KnnOptions, knn_classify, knn_predict
from look.evaluation import knn as knn_module


def brute_force_knn(
    train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, k: int, tau: float
) -> torch.Tensor:
    """One query at a time, with plain Python votes: the reference the chunked code must match."""
    train = F.normalize(train.double(), dim=1)
    test = F.normalize(test.double(), dim=1)
    predictions = []
    for query in test:
        similarities = (train @ query).tolist()
        order = sorted(range(len(train)), key=lambda j: -similarities[j])[:k]
        votes: dict[int, float] = {}
        for j in order:
            label = int(train_labels[j])
            votes[label] = votes.get(label, 0.0) + math.exp(similarities[j] / tau)
        predictions.append(max(votes, key=votes.__getitem__))
    return torch.tensor(predictions)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_matches_brute_force_on_random_data(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small chunks so that several query and memory chunks are merged.
    monkeypatch.setattr(knn_module, "_QUERY_CHUNK", 7)
    monkeypatch.setattr(knn_module, "_MEMORY_CHUNK", 16)
    g = torch.Generator().manual_seed(k)
    train, test = torch.randn(90, 6, generator=g), torch.randn(25, 6, generator=g)
    train_labels = torch.randint(0, 5, (90,), generator=g)
    for tau in (0.07, 0.5):
        predicted = knn_predict(train, train_labels, test, [k], temperature=tau, num_classes=5)[k]
        assert torch.equal(predicted, brute_force_knn(train, train_labels, test, k, tau))


def test_temperature_changes_the_vote() -> None:
    # Query close to one class-0 point, further from two class-1 points: a low temperature lets
    # the single nearest neighbour win, a high one lets the majority win.
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.05]])
    assert knn_predict(train, labels, query, [3], temperature=0.05)[3].item() == 0
    assert knn_predict(train, labels, query, [3], temperature=10.0)[3].item() == 1


def test_k_larger_than_the_memory_is_clipped() -> None:
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(12, 4, generator=g), torch.randn(5, 4, generator=g)
    train_labels, test_labels = torch.arange(12) % 3, torch.arange(5) % 3
    result = knn_classify(
        train, train_labels, test, test_labels, options=KnnOptions(ks=(4, 200), temperature=0.07)
    )
    big = result["results"][1]
    assert big["k"] == 200 and big["k_effective"] == 12
    expected = brute_force_knn(train, train_labels, test, 12, 0.07)
    assert big["top1"] == pytest.approx(100.0 * (expected == test_labels).double().mean().item())


def test_bad_options_are_refused() -> None:
    features, labels = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_classify(features, labels, features, labels, options=KnnOptions(ks=(0,)))
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(features, labels, features, labels, options=KnnOptions(temperature=0.0))
    with pytest.raises(ValueError, match="at least one training image"):
        knn_predict(torch.empty(0, 3), torch.empty(0, dtype=torch.int64), features, [1])
    with pytest.raises(ValueError, match="finite and > 0"):
        KnnOptions(temperature=float("inf")).validate()
    # knn_predict, public too, checks its inputs as knn_classify does.
    nan_queries = torch.full((2, 3), float("nan"))
    for wrong, message in (
        ({"test_features": nan_queries}, "test features hold NaN"),
        ({"ks": 5}, "non-empty tuple of ints"),
        ({"num_classes": 1}, "below num_classes=1"),
        ({"test_features": torch.randn(2, 4)}, "dimension|dim"),
    ):
        arguments = {"train_features": features, "train_labels": labels,
                     "test_features": features, "ks": (1,), **wrong}  # fmt: skip
        with pytest.raises(ValueError, match=message):
            knn_predict(**arguments)  # type: ignore[arg-type]
