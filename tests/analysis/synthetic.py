"""Synthetic feature sets with known structure, shared by the analysis tests."""

from __future__ import annotations

import numpy as np

# Fine class → coarse class of the synthetic sets: coarse 0 holds fine 0, 1, 2; coarse 1 holds
# fine 3, 4; coarse 2 holds fine 5 only.
FINE_TO_COARSE = np.array([0, 0, 0, 1, 1, 2])
FINE_NAMES = ["tee", "shirt", "coat", "trouser", "dress", "bag"]
COARSE_NAMES = ["tops", "bottoms", "bags"]


def separated_fine_features(
    rows_per_fine: int, dim: int = 16, *, seed: int = 0, spread: float = 0.3
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every fine class a tight, well separated cluster: fine structure fully kept."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(FINE_TO_COARSE), dim)) * 3.0
    fine = np.repeat(np.arange(len(FINE_TO_COARSE)), rows_per_fine)
    features = centres[fine] + spread * rng.standard_normal((fine.size, dim))
    return features.astype(np.float32), fine, FINE_TO_COARSE[fine]


def collapsed_fine_features(
    rows_per_fine: int, dim: int = 16, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each coarse class one Gaussian blob, fine labels independent of the features."""
    rng = np.random.default_rng(seed)
    coarse_centres = rng.standard_normal((int(FINE_TO_COARSE.max()) + 1, dim)) * 4.0
    fine = np.repeat(np.arange(len(FINE_TO_COARSE)), rows_per_fine)
    coarse = FINE_TO_COARSE[fine]
    features = coarse_centres[coarse] + rng.standard_normal((fine.size, dim))
    return features.astype(np.float32), fine, coarse


def evaluation_results(
    *,
    method: str | None = "look",
    seed: int = 0,
    linear_top1: float = 81.25,
    dataset: str = "fashion_mnist",
    labels: str = "fine",
    class_names: list[str] | None = None,
    cache_path: str | None = None,
) -> dict:
    """A results.json in the shape `look evaluate` writes ("look-evaluation/1", percent)."""
    return {
        "format": "look-evaluation/1",
        "units": "accuracies in percent",
        "model": {
            "source": "checkpoint",
            "path": "/runs/x/ckpt.pt",
            "backbone": "resnet18",
            "method": method,
            "global_step": 100,
            "feature_dim": 512,
            "pretraining": {
                "dataset": dataset,
                "labels": "coarse",
                "method": method,
                "seed": seed,
                "image_size": 28,
            },
        },
        "dataset": {"name": dataset, "class_names": class_names or [], "num_classes": 10},
        "labels": {"evaluation": labels, "pretraining": "coarse"},
        "protocols": {
            "linear": {
                "top1": linear_top1,
                "mean_per_class_accuracy": linear_top1 - 1.0,
                "best_c": 0.1,
                "num_train": 600,
                "validation_curve": [{"c": 0.1}],
                "features": "backbone",
            },
            "knn": {
                "temperature": 0.07,
                "num_train": 600,
                "results": [
                    {"k": 20, "k_effective": 20, "top1": 70.0, "mean_per_class_accuracy": 69.0},
                    {"k": 200, "k_effective": 200, "top1": 65.0, "mean_per_class_accuracy": 64.0},
                ],
                "features": "backbone",
            },
            "fewshot": {
                "seed": 0,
                "settings": [
                    {
                        "n_way": 5,
                        "k_shot": 1,
                        "episodes": 100,
                        "mean_accuracy": 50.0,
                        "ci95": 1.5,
                        "std": 7.0,
                    },
                    {
                        "n_way": 5,
                        "k_shot": 5,
                        "episodes": 100,
                        "mean_accuracy": 60.0,
                        "ci95": 1.2,
                        "std": 6.0,
                    },
                ],
                "features": "backbone",
            },
            "finetune": {"top1": 90.0, "mean_per_class_accuracy": 89.0, "epochs": 5, "lr": 0.01},
        },
        "features": {"test": {"num_images": 10, "cache_path": cache_path}},
        "seed": 7,
    }
