"""Tests for look.analysis.multimodality on synthetic features with known fine structure."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from look.analysis.features import WHOLE_SET_GROUP
from look.analysis.multimodality import (
    estimate_cluster_count,
    knn_label_purity,
    knn_purity_chance,
    linear_separability,
    multimodality_metrics,
)
from tests.analysis.synthetic import COARSE_NAMES


def unit_vectors(degrees: list[float]) -> np.ndarray:
    radians = np.deg2rad(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


def test_purity_by_hand_uses_cosine_and_leaves_each_row_out() -> None:
    # Two pairs of nearby directions. With k=1 each row's nearest *other* row is its partner
    # (same label); with k=2 the second neighbour is from the other pair: purity 1/2.
    features = unit_vectors([0.0, 10.0, 90.0, 100.0]) * np.array([[1.0], [5.0], [0.2], [3.0]])
    labels = np.array([0, 0, 1, 1])
    assert knn_label_purity(features, labels, k=1) == pytest.approx(1.0)
    assert knn_label_purity(features, labels, k=2) == pytest.approx(0.5)
    # k larger than N - 1 is capped: every row then sees all 3 others, 1 of them same-label.
    assert knn_label_purity(torch.from_numpy(features), torch.from_numpy(labels), k=50) == (
        pytest.approx(1 / 3)
    )


def test_chance_purity_by_hand() -> None:
    # Sum over classes n_c (n_c - 1) / (n (n - 1)) = (2*1 + 3*2) / (5*4).
    assert knn_purity_chance(np.array([0, 0, 1, 1, 1])) == pytest.approx(0.4)


def test_purity_is_one_for_separated_fine_clusters_and_chance_for_random_labels(
    separated: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    features, fine, coarse = separated
    inside = coarse == 0
    assert knn_label_purity(features[inside], fine[inside], k=10) == pytest.approx(1.0)

    rng = np.random.default_rng(1)
    blob = rng.standard_normal((600, 16)).astype(np.float32)
    random_labels = rng.integers(0, 3, 600)
    purity = knn_label_purity(blob, random_labels, k=10)
    assert abs(purity - knn_purity_chance(random_labels)) < 0.05


def test_separability_high_for_separated_and_near_chance_for_random_labels(
    separated: tuple[np.ndarray, np.ndarray, np.ndarray],
    collapsed: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    features, fine, coarse = separated
    inside = coarse == 0
    result = linear_separability(features[inside], fine[inside], seed=0)
    assert result is not None
    accuracy, chance = result
    assert accuracy == pytest.approx(1.0)
    assert chance == pytest.approx(1 / 3)

    features, fine, coarse = collapsed
    inside = coarse == 0
    result = linear_separability(features[inside], fine[inside], seed=0)
    assert result is not None
    accuracy, chance = result
    assert accuracy < chance + 0.15


def test_separability_is_undefined_without_two_splittable_classes() -> None:
    features = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    assert linear_separability(features, np.zeros(6, dtype=np.int64)) is None
    assert linear_separability(features, np.array([0, 0, 0, 0, 0, 1])) is None
    # Two samples per class: the folds are lowered to 2 instead of failing.
    assert linear_separability(features, np.array([0, 0, 1, 1, 2, 2])) is not None


def test_cluster_count_recovers_three_modes_and_one_for_a_single_gaussian() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 16)) * 4.0
    modes = np.repeat(np.arange(3), 80)
    three = (centres[modes] + 0.5 * rng.standard_normal((240, 16))).astype(np.float32)
    estimate = estimate_cluster_count(three, max_clusters=6, seed=0)
    assert estimate.count == 3
    assert estimate.best_silhouette is not None and estimate.best_silhouette > 0.5
    # The clustering is the modes up to a relabelling.
    pairs = set(zip(modes.tolist(), estimate.assignments.tolist(), strict=True))
    assert len(pairs) == 3

    single = (rng.standard_normal((240, 16)) + 5.0).astype(np.float32)
    estimate = estimate_cluster_count(single, max_clusters=6, seed=0)
    assert estimate.count == 1
    assert np.all(estimate.assignments == 0)
    assert set(estimate.silhouettes) == {2, 3, 4, 5, 6}


def test_metrics_per_coarse_class_and_summary(
    separated: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    features, fine, coarse = separated
    result = multimodality_metrics(
        features, fine, coarse, coarse_names=COARSE_NAMES, k=10, max_clusters=5, seed=0
    )
    json.dumps(result)  # plain JSON-able types only
    tops, bottoms, bags = (result["per_coarse"][name] for name in COARSE_NAMES)
    assert tops["num_fine_classes"] == 3 and bottoms["num_fine_classes"] == 2
    for entry in (tops, bottoms):
        assert entry["knn_purity"] == pytest.approx(1.0)
        assert entry["separability"] == pytest.approx(1.0)
        assert entry["ari"] == pytest.approx(1.0)
        assert entry["ari_at_fine_count"] == pytest.approx(1.0)
    assert tops["cluster_count"] == 3.0
    assert bottoms["cluster_count"] == 2.0
    assert tops["knn_purity_chance"] == pytest.approx(59 / 179)
    # One fine class: nothing to measure but the cluster count; left out of the averages.
    assert bags["knn_purity"] is None and bags["separability"] is None and bags["ari"] is None
    assert bags["cluster_count"] == 1.0
    summary = result["summary"]
    assert summary["knn_purity"] == pytest.approx(1.0)
    assert summary["cluster_count"] == pytest.approx(2.5)
    assert summary["num_coarse_classes"] == 3
    assert summary["num_coarse_classes_with_several_fine"] == 2


def test_collapsed_features_score_near_chance(
    collapsed: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    features, fine, coarse = collapsed
    result = multimodality_metrics(torch.from_numpy(features), torch.from_numpy(fine), coarse)
    summary = result["summary"]
    assert abs(summary["knn_purity"] - summary["knn_purity_chance"]) < 0.1
    assert summary["separability"] < summary["separability_chance"] + 0.15
    assert summary["cluster_count"] == 1.0
    assert summary["ari"] == pytest.approx(0.0)
    # Default names when none are given.
    assert set(result["per_coarse"]) == {"group 0", "group 1", "group 2"}


def test_subsampling_is_seeded_and_capped() -> None:
    features, fine, coarse = (
        np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32),
        np.repeat([0, 1, 2], 100),
        np.zeros(300, dtype=np.int64),
    )
    first = multimodality_metrics(features, fine, coarse, max_per_coarse=50, seed=3)
    second = multimodality_metrics(features, fine, coarse, max_per_coarse=50, seed=3)
    assert first == second
    assert first["per_coarse"]["group 0"]["num_samples"] == 50
    everything = multimodality_metrics(features, fine, None, max_per_coarse=None)
    assert everything["per_coarse"][WHOLE_SET_GROUP]["num_samples"] == 300


def test_bad_input_is_rejected_with_clear_errors() -> None:
    features = np.zeros((4, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="exactly one coarse class"):
        multimodality_metrics(features, np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]))
    with pytest.raises(ValueError, match="NaN"):
        multimodality_metrics(np.full((4, 3), math.nan, dtype=np.float32), np.array([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="length 4"):
        multimodality_metrics(features, np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="has no name"):
        multimodality_metrics(
            features, np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1]), coarse_names=["a"]
        )
    with pytest.raises(ValueError, match="k must be"):
        multimodality_metrics(features, np.array([0, 0, 1, 1]), k=0)


def test_purity_saturates_for_fine_classes_no_larger_than_k_as_documented() -> None:
    # Three perfectly separated classes of 4 images: each row has only 3 same-label rows, so
    # with k = 10 its purity is at most (n_f - 1) / k = 0.3, as the docstring states.
    features = np.repeat(np.eye(3, dtype=np.float32), 4, axis=0)
    labels = np.repeat([0, 1, 2], 4)
    assert knn_label_purity(features, labels, k=10) == pytest.approx(3 / 10)
    assert knn_label_purity(features, labels, k=3) == pytest.approx(1.0)
    doc = " ".join((knn_label_purity.__doc__ or "").split())
    assert "(n_f − 1) / k" in doc and "min(k, n_f − 1) / k" in doc
