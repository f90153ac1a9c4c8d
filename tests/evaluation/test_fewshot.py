from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch

from look.evaluation import (
    FewShotOptions,
    confidence_interval_95,
    fewshot_episode_accuracies,
    fewshot_evaluate,
)
from look.evaluation.fewshot import SPEC_MIN_EPISODES, FewShotEpisodesWarning


def clustered_features(
    num_classes: int, per_class: int, *, noise: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, 16, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[labels] + noise * torch.randn(len(labels), 16, generator=g), labels


def test_confidence_interval_hand_example() -> None:
    # Accuracies 50, 70, 90: mean 70, population std sqrt(800/3) = 16.3299, CI 1.96·std/√3.
    assert confidence_interval_95([50.0, 70.0, 90.0]) == pytest.approx(
        1.96 * math.sqrt(800.0 / 3.0) / math.sqrt(3.0)
    )
    assert confidence_interval_95(np.full(600, 80.0)) == 0.0


def test_trivially_separable_features_give_perfect_accuracy() -> None:
    labels = torch.arange(6).repeat_interleave(20)
    features = torch.eye(6)[labels] * 3.0  # every class on its own axis
    result = fewshot_evaluate(
        features,
        labels,
        options=FewShotOptions(
            n_way=5, shots=(1, 5), queries=10, episodes=40, warn_few_episodes=False
        ),
    )
    for setting in result["settings"]:
        assert setting["mean_accuracy"] == 100.0 and setting["ci95"] == 0.0
    assert "nearest centroid" in result["classifier"] and "cosine" in result["classifier"]


def test_episodes_are_deterministic_for_a_seed_and_differ_across_seeds() -> None:
    features, labels = clustered_features(8, 25, noise=2.0)
    kwargs = {"n_way": 5, "k_shot": 1, "queries": 5, "episodes": 60}
    first, eligible = fewshot_episode_accuracies(features, labels, seed=3, **kwargs)
    again, _ = fewshot_episode_accuracies(features, labels, seed=3, **kwargs)
    other, _ = fewshot_episode_accuracies(features, labels, seed=4, **kwargs)
    assert eligible == 8 and first.shape == (60,)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    # With noisy classes more support images help.
    five_shot, _ = fewshot_episode_accuracies(features, labels, seed=3, **{**kwargs, "k_shot": 5})
    assert five_shot.mean() > first.mean()


def test_only_classes_with_enough_images_are_sampled() -> None:
    features, labels = clustered_features(6, 10, noise=0.1)
    # Classes 0-2 keep 10 images, 3-5 only 3: with 1 shot + 5 queries only 3 classes qualify.
    keep = (labels < 3) | (torch.arange(len(labels)) % 10 < 3)
    features, labels = features[keep], labels[keep]
    _, eligible = fewshot_episode_accuracies(
        features, labels, n_way=3, k_shot=1, queries=5, episodes=5, seed=0
    )
    assert eligible == 3
    with pytest.raises(ValueError, match="only 3 of the 6 classes present in the test split qualify"):
        fewshot_episode_accuracies(
            features, labels, n_way=4, k_shot=1, queries=5, episodes=5, seed=0
        )


def test_bad_options_are_refused() -> None:
    features, labels = clustered_features(5, 20, noise=0.1)
    for options in (
        FewShotOptions(n_way=1),
        FewShotOptions(shots=(0,)),
        FewShotOptions(queries=0),
        FewShotOptions(episodes=0),
        FewShotOptions(shots=1),  # type: ignore[arg-type]  # (a bare int, not a tuple)
        FewShotOptions(episodes=2.5),  # type: ignore[arg-type]
        FewShotOptions(n_way=True),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError, match="few-shot"):
            fewshot_evaluate(features, labels, options=options)


def test_fewer_episodes_than_the_protocol_warn_once_and_are_recorded() -> None:
    features, labels = clustered_features(6, 20, noise=0.5)
    options = FewShotOptions(n_way=3, shots=(1, 5), queries=5, episodes=50)
    with pytest.warns(FewShotEpisodesWarning) as caught:
        result = fewshot_evaluate(features, labels, options=options)
    few = [w for w in caught if w.category is FewShotEpisodesWarning]
    assert len(few) == 1, "one warning per evaluation, not one per shot setting"
    assert "50 episodes" in str(few[0].message) and "600" in str(few[0].message)
    assert result["episodes_below_spec"] is True and result["spec_min_episodes"] == 600
    # Suppressible for a deliberate smoke run; the result still says so.
    with warnings.catch_warnings():
        warnings.simplefilter("error", FewShotEpisodesWarning)
        quiet = fewshot_evaluate(
            features, labels, options=dataclasses.replace(options, warn_few_episodes=False)
        )
        full = fewshot_evaluate(
            features,
            labels,
            options=FewShotOptions(n_way=3, shots=(1,), queries=5, episodes=SPEC_MIN_EPISODES),
        )
    assert quiet["episodes_below_spec"] is True
    assert full["episodes_below_spec"] is False and SPEC_MIN_EPISODES == 600
