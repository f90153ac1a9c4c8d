"""Few-shot evaluation: N-way K-shot episodes on frozen features, nearest-centroid classifier.

Episodes are drawn from the test split among the classes with at least ``K + Q`` images: ``N``
classes, then ``K`` support and ``Q`` query images of each, without replacement. Features are
L2-normalised; each class prototype is the normalised mean of its support features and a query
goes to the prototype with the largest cosine similarity. The result is the mean episode
accuracy ± the 95 % confidence half-width ``1.96 · std / √episodes`` (population std).

The protocol asks for at least :data:`SPEC_MIN_EPISODES` (600) episodes per setting; fewer are run
when asked (tests, smoke runs), with a :class:`FewShotEpisodesWarning` unless the caller sets
``FewShotOptions.warn_few_episodes=False``; the result records it either way.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from look.data.sources import class_members
from look.evaluation.metrics import check_labelled_features

__all__ = [
    "FEWSHOT_CLASSIFIER",
    "SPEC_MIN_EPISODES",
    "FewShotEpisodesWarning",
    "FewShotOptions",
    "confidence_interval_95",
    "fewshot_episode_accuracies",
    "fewshot_evaluate",
]

FEWSHOT_CLASSIFIER = (
    "nearest centroid, cosine similarity: prototype = normalised mean of the L2-normalised "
    "support features"
)
# Episodes processed together (bounds memory to chunk × N × (K+Q) × d).
_EPISODE_CHUNK = 100
# The transfer protocol's minimum for a reported mean ± 95 % CI (docs/method.md).
SPEC_MIN_EPISODES = 600


class FewShotEpisodesWarning(UserWarning):
    """Fewer few-shot episodes than the protocol's 600: the 95 % interval is wider than specified."""


@dataclass(frozen=True)
class FewShotOptions:
    """``n_way`` classes per episode, each of ``shots`` (one setting per value), ``queries`` per class.

    ``episodes`` below :data:`SPEC_MIN_EPISODES` are run but warned about once per evaluation;
    ``warn_few_episodes=False`` silences that warning for a caller that runs fewer on purpose
    (a smoke run), and the result still records ``episodes_below_spec``.
    """

    n_way: int = 5
    shots: tuple[int, ...] = (1, 5)
    queries: int = 15
    episodes: int = SPEC_MIN_EPISODES
    warn_few_episodes: bool = True

    def validate(self) -> None:
        for name, value, least in (
            ("queries", self.queries, 1), ("n_way", self.n_way, 2), ("episodes", self.episodes, 1)
        ):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"few-shot {name}={value!r} must be an integer >= {least}")
        if (
            isinstance(self.shots, (int, str))
            or not self.shots
            or any(
                isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1
                for k in self.shots
            )
        ):
            raise ValueError(
                f"few-shot shots={self.shots!r} must be a non-empty tuple of integers >= 1, "
                "e.g. (1, 5)"
            )


def confidence_interval_95(accuracies: Sequence[float] | np.ndarray) -> float:
    """Half-width of the 95 % normal interval of the mean: ``1.96 · std / √n`` (population std)."""
    values = np.asarray(accuracies, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no episode accuracies to summarise")
    return float(1.96 * values.std() / math.sqrt(values.size))


def _episode_generator(seed: int, n_way: int, k_shot: int) -> np.random.Generator:
    """An independent stream per (seed, setting): 1-shot and 5-shot episodes do not share draws."""
    return np.random.default_rng(np.random.SeedSequence([seed, n_way, k_shot]))


def eligible_classes(labels: Tensor, *, n_way: int, k_shot: int, queries: int) -> np.ndarray:
    """The classes with ``k_shot + queries`` images or more; ``ValueError`` when fewer than
    ``n_way`` of them are left (an episode could not be drawn)."""
    per_class = k_shot + queries
    classes, counts = np.unique(labels.cpu().numpy(), return_counts=True)
    eligible = classes[counts >= per_class]
    if len(eligible) < n_way:
        raise ValueError(
            f"{n_way}-way {k_shot}-shot episodes with {queries} queries need {n_way} classes with "
            f"at least {per_class} test images each; only {len(eligible)} of the {len(classes)} "
            "classes present in the test split qualify. Lower n_way, shots or queries (`look evaluate --fewshot-ways, "
            "--fewshot-shots, --fewshot-queries`), or leave fewshot out of --protocol"
        )
    return eligible


def check_fewshot_feasible(labels: Tensor, options: FewShotOptions) -> None:
    """Raise before any feature is extracted if some shot setting cannot draw its episodes."""
    for k_shot in options.shots:
        eligible_classes(labels, n_way=options.n_way, k_shot=k_shot, queries=options.queries)


def fewshot_episode_accuracies(
    features: Tensor,
    labels: Tensor,
    *,
    n_way: int,
    k_shot: int,
    queries: int,
    episodes: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, int]:
    """Accuracy (percent) of each episode and the number of classes that qualified.

    Raises ``ValueError`` when fewer than ``n_way`` classes have ``k_shot + queries`` images.
    """
    if len(features) != len(labels) or features.ndim != 2:
        raise ValueError(
            f"need features (n, d) and labels (n,), got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    per_class = k_shot + queries
    label_array = labels.cpu().numpy()
    eligible = eligible_classes(labels, n_way=n_way, k_shot=k_shot, queries=queries)
    each_class = class_members(label_array)
    members = {int(c): each_class[int(c)] for c in eligible}
    rng = _episode_generator(seed, n_way, k_shot)
    # Draw every episode's indices first (deterministic for the seed), then classify in chunks.
    episode_indices = np.empty((episodes, n_way, per_class), dtype=np.int64)
    for e in range(episodes):
        chosen = rng.choice(eligible, size=n_way, replace=False)
        for w, c in enumerate(chosen):
            episode_indices[e, w] = rng.choice(members[int(c)], size=per_class, replace=False)
    device = torch.device(device)
    normalised = F.normalize(features.to(device, torch.float32), dim=1)
    targets = torch.arange(n_way, device=device).repeat_interleave(queries)
    accuracies = []
    for start in range(0, episodes, _EPISODE_CHUNK):
        index = torch.from_numpy(episode_indices[start : start + _EPISODE_CHUNK]).to(device)
        batch = normalised[index]  # (E, N, K+Q, d)
        prototypes = F.normalize(batch[:, :, :k_shot].mean(dim=2), dim=2)  # (E, N, d)
        query = batch[:, :, k_shot:].reshape(len(index), n_way * queries, -1)  # (E, N·Q, d)
        predicted = torch.einsum("eqd,ewd->eqw", query, prototypes).argmax(dim=2)
        accuracies.append(100.0 * (predicted == targets).double().mean(dim=1).cpu())
    return torch.cat(accuracies).numpy(), len(eligible)


def fewshot_evaluate(
    features: Tensor,
    labels: Tensor,
    *,
    options: FewShotOptions | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Mean accuracy ± 95 % CI for every shot setting; a JSON-ready dict (percent)."""
    options = options or FewShotOptions()
    options.validate()
    check_labelled_features(features, labels, "few-shot")
    below_spec = options.episodes < SPEC_MIN_EPISODES
    if below_spec and options.warn_few_episodes:
        # Once per evaluation, not per shot setting; the same text for the same settings lets
        # Python's default filter show it once per process.
        warnings.warn(
            f"few-shot: {options.episodes} episodes per setting, fewer than the {SPEC_MIN_EPISODES} "
            f"the protocol specifies for its mean ± 95% CI (the interval is about "
            f"{math.sqrt(SPEC_MIN_EPISODES / options.episodes):.1f}x as wide); raise "
            "--fewshot-episodes, or pass FewShotOptions(warn_few_episodes=False) for a deliberate "
            "smoke run",
            FewShotEpisodesWarning,
            stacklevel=2,
        )
    settings = []
    eligible = 0
    for k_shot in options.shots:
        accuracies, eligible = fewshot_episode_accuracies(
            features,
            labels,
            n_way=options.n_way,
            k_shot=k_shot,
            queries=options.queries,
            episodes=options.episodes,
            seed=seed,
            device=device,
        )
        settings.append(
            {
                "n_way": options.n_way,
                "k_shot": k_shot,
                "queries_per_class": options.queries,
                "episodes": options.episodes,
                "mean_accuracy": float(accuracies.mean()),
                "ci95": confidence_interval_95(accuracies),
                "std": float(accuracies.std()),
                "eligible_classes": eligible,
            }
        )
    return {
        "classifier": FEWSHOT_CLASSIFIER,
        "split": "test",
        "ci": "1.96 * std / sqrt(episodes), population std over episode accuracies",
        "seed": seed,
        "spec_min_episodes": SPEC_MIN_EPISODES,
        "episodes_below_spec": below_spec,
        "few_episodes_warned": below_spec and options.warn_few_episodes,
        "settings": settings,
    }
