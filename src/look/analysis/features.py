"""Feature files: the input of ``look analyze`` (frozen features of one model on one dataset).

A feature file is a ``.pt`` file written with ``torch.save`` of a dict::

    {
        "features": FloatTensor (N, D),        # frozen backbone features, one row per image
        "labels": LongTensor (N,),             # fine labels, 0 .. len(fine_names) - 1
        "coarse_labels": LongTensor (N,) | None,
        "fine_names": [str, ...],              # may be empty: names default to "class 0", ...
        "coarse_names": [str, ...] | None,
        "name": str,                           # panel title / row label, e.g. "look seed 0"
        # optional, copied into multimodality.json so that `look report` can group by method:
        "model": {"name": str, "method": str | None, "seed": int | None, ...} | None,
        "dataset": str | None,
    }

Each fine class must belong to exactly one coarse class. When ``coarse_labels`` is ``None`` a class
grouping (see :mod:`look.data.groupings`) can supply them from ``fine_names``
(:meth:`FeatureSet.with_grouping`).

``"fine_labels"`` is accepted for ``"labels"``, so a feature cache file of ``look evaluate``
(``{"features", "fine_labels", "unreadable", "meta"}``) loads too, without names and without the
rows of the images whose file could not be decoded (``"unreadable"``: their indices), as
evaluation leaves them out.

This module is also the adapter between evaluation and analysis, and it never imports
``look.evaluation``: either whatever extracts features writes them with :func:`save_feature_set`,
or :func:`feature_sets_from_results` follows a ``results.json`` to the feature cache file it
records (``features.<split>.cache_path``) and takes names, model and dataset from the results.
By convention feature files are named ``*.features.pt`` (:data:`FEATURE_FILE_SUFFIX`);
:func:`collect_feature_sets` finds both kinds under folders (``look analyze --results DIR``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FEATURE_FILE_SUFFIX",
    "FeatureSet",
    "check_fine_to_coarse",
    "collect_feature_sets",
    "feature_sets_from_results",
    "load_feature_set",
    "save_feature_set",
]

FEATURE_FILE_SUFFIX = ".features.pt"


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """Frozen features of one model on one dataset, with fine (and optionally coarse) labels."""

    name: str
    features: Tensor
    labels: Tensor
    coarse_labels: Tensor | None = None
    fine_names: tuple[str, ...] = ()
    coarse_names: tuple[str, ...] = ()
    model: Mapping[str, Any] | None = None
    dataset: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a feature set needs a non-empty name, got {self.name!r}")
        features, labels = self.features, self.labels
        if not isinstance(features, Tensor) or features.dim() != 2:
            raise ValueError(
                f"feature set {self.name!r}: 'features' must be a 2-D tensor (N, D), got "
                f"{getattr(features, 'shape', type(features).__name__)}"
            )
        if not features.is_floating_point():
            raise ValueError(
                f"feature set {self.name!r}: 'features' must be floating point, got {features.dtype}"
            )
        if features.shape[0] == 0:
            raise ValueError(f"feature set {self.name!r} has no rows")
        _check_label_vector(labels, "labels", features.shape[0], self.name)
        if self.coarse_labels is not None:
            _check_label_vector(self.coarse_labels, "coarse_labels", features.shape[0], self.name)
            check_fine_to_coarse(labels, self.coarse_labels)
        if self.fine_names and int(labels.max()) >= len(self.fine_names):
            raise ValueError(
                f"feature set {self.name!r}: label {int(labels.max())} has no name "
                f"({len(self.fine_names)} fine_names given)"
            )
        if (
            self.coarse_labels is not None
            and self.coarse_names
            and int(self.coarse_labels.max()) >= len(self.coarse_names)
        ):
            raise ValueError(
                f"feature set {self.name!r}: coarse label {int(self.coarse_labels.max())} has no "
                f"name ({len(self.coarse_names)} coarse_names given)"
            )

    @property
    def fine_class_names(self) -> list[str]:
        """Name of every fine label (``"class i"`` where the file gave none)."""
        count = int(self.labels.max()) + 1
        return list(self.fine_names) if self.fine_names else [f"class {i}" for i in range(count)]

    @property
    def coarse_class_names(self) -> list[str]:
        """Name of every coarse label (``"group i"`` where the file gave none; one group without
        coarse labels)."""
        if self.coarse_labels is None:
            return ["all classes"]
        count = int(self.coarse_labels.max()) + 1
        return (
            list(self.coarse_names) if self.coarse_names else [f"group {i}" for i in range(count)]
        )

    def with_grouping(self, grouping_name_or_path: str | Path) -> FeatureSet:
        """A copy whose coarse labels come from a class grouping applied to ``fine_names``."""
        from look.data.groupings import load_grouping

        if not self.fine_names:
            raise ValueError(
                f"feature set {self.name!r} has no fine_names, so a class grouping cannot be "
                "applied; store the class names in the feature file"
            )
        grouping = load_grouping(grouping_name_or_path)
        coarse_names, fine_to_coarse = grouping.apply(self.fine_names)
        return dataclasses.replace(
            self,
            coarse_labels=fine_to_coarse[self.labels],
            coarse_names=tuple(coarse_names),
        )


def _check_label_vector(labels: object, key: str, rows: int, name: str) -> None:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(
            f"feature set {name!r}: {key!r} must be a 1-D tensor of length {rows} (one per "
            f"feature row), got {getattr(labels, 'shape', type(labels).__name__)}"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"feature set {name!r}: {key!r} must be integer, got {labels.dtype}")
    if rows and int(labels.min()) < 0:
        raise ValueError(f"feature set {name!r}: {key!r} must be >= 0, got {int(labels.min())}")


def check_fine_to_coarse(
    fine_labels: Tensor | np.ndarray, coarse_labels: Tensor | np.ndarray
) -> dict[int, int]:
    """The map fine label → coarse label; ``ValueError`` when a fine class has several coarse ones."""
    fine = np.asarray(fine_labels).astype(np.int64)
    coarse = np.asarray(coarse_labels).astype(np.int64)
    pairs = np.unique(np.stack([fine, coarse], axis=1), axis=0)
    mapping: dict[int, int] = {}
    for fine_label, coarse_label in pairs.tolist():
        if fine_label in mapping:
            raise ValueError(
                f"fine label {fine_label} appears in coarse classes {mapping[fine_label]} and "
                f"{coarse_label}; each fine class must belong to exactly one coarse class"
            )
        mapping[fine_label] = coarse_label
    return mapping


def save_feature_set(feature_set: FeatureSet, path: str | Path) -> Path:
    """Write ``feature_set`` as a feature file (format in the module docstring); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "features": feature_set.features.detach().cpu(),
        "labels": feature_set.labels.detach().cpu().to(torch.int64),
        "coarse_labels": None
        if feature_set.coarse_labels is None
        else feature_set.coarse_labels.detach().cpu().to(torch.int64),
        "fine_names": list(feature_set.fine_names),
        "coarse_names": list(feature_set.coarse_names),
        "name": feature_set.name,
        "model": None if feature_set.model is None else dict(feature_set.model),
        "dataset": feature_set.dataset,
    }
    torch.save(payload, path)
    return path


def load_feature_set(path: str | Path) -> FeatureSet:
    """Read a feature file; ``FileNotFoundError``/``ValueError`` name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"feature file {path} does not exist (expected a .pt file saved with torch.save of "
            '{"features": ..., "labels": ..., ...}; see look.analysis.features)'
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for a bad file
        raise ValueError(f"feature file {path} could not be read by torch.load: {error}") from error
    labels_key = "labels" if isinstance(payload, dict) and "labels" in payload else "fine_labels"
    if not isinstance(payload, dict) or "features" not in payload or labels_key not in payload:
        keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(
            f"feature file {path} must hold a dict with at least 'features' and 'labels', got {keys}"
        )
    model = payload.get("model")
    features, labels, coarse_labels = (
        payload["features"],
        payload[labels_key],
        payload.get("coarse_labels"),
    )
    unreadable = payload.get("unreadable")
    if (
        isinstance(unreadable, Tensor)
        and unreadable.numel()
        and isinstance(features, Tensor)
        and isinstance(labels, Tensor)
    ):
        keep = torch.ones(len(features), dtype=torch.bool)
        keep[unreadable] = False  # rows of a substitute image, not of the unreadable one
        features, labels = features[keep], labels[keep]
        coarse_labels = coarse_labels[keep] if isinstance(coarse_labels, Tensor) else None
    return FeatureSet(
        name=str(payload.get("name") or path.name.removesuffix(FEATURE_FILE_SUFFIX)),
        features=features,
        labels=labels,
        coarse_labels=coarse_labels,
        fine_names=tuple(str(n) for n in payload.get("fine_names") or ()),
        coarse_names=tuple(str(n) for n in payload.get("coarse_names") or ()),
        model=dict(model) if isinstance(model, Mapping) else None,
        dataset=payload.get("dataset") if isinstance(payload.get("dataset"), str) else None,
    )


def feature_sets_from_results(
    results_files: Sequence[str | Path], *, split: str = "test"
) -> list[tuple[Path, FeatureSet]]:
    """Feature sets of evaluations, read from the cache files their ``results.json`` record.

    For each file, ``features.<split>.cache_path`` must exist (``FileNotFoundError`` otherwise:
    the cache was cleared or lives on another machine). The set is named after the run's method
    label and seed; fine class names are the evaluation's class names when it used fine labels;
    coarse labels come from the dataset's shipped coarse grouping when there is one (else pass a
    grouping, see :meth:`FeatureSet.with_grouping`). Two results that share one cache file give one
    feature set. Returns ``(cache file, feature set)`` pairs.
    """
    from look.analysis.results import read_results_file
    from look.data.groupings import DATASET_COARSE_GROUPING

    found: dict[Path, FeatureSet] = {}
    for results_file in results_files:
        result = read_results_file(results_file)
        cache = result.feature_caches.get(split)
        if cache is None:
            raise FileNotFoundError(
                f"{results_file} records no feature cache for split {split!r} (features.{split}."
                "cache_path); re-run look evaluate with a feature cache, or pass feature files"
            )
        cache = cache.expanduser().resolve()
        if cache in found:
            continue
        if not cache.is_file():
            raise FileNotFoundError(
                f"feature cache {cache} recorded by {results_file} does not exist (cleared, or "
                "made on another machine); re-run look evaluate to rebuild it"
            )
        loaded = load_feature_set(cache)
        fine_names: tuple[str, ...] = ()
        if result.labels in (None, "fine") and len(result.class_names) > int(loaded.labels.max()):
            fine_names = result.class_names
        seed = f" seed {result.seed}" if result.seed is not None else ""
        feature_set = dataclasses.replace(
            loaded,
            name=f"{result.method}{seed}",
            fine_names=fine_names,
            model=result.model,
            dataset=result.dataset,
        )
        grouping = DATASET_COARSE_GROUPING.get(result.dataset)
        if fine_names and grouping is not None:
            feature_set = feature_set.with_grouping(grouping)
        found[cache] = feature_set
    return list(found.items())


def collect_feature_sets(
    paths: Sequence[str | Path], *, split: str = "test"
) -> list[tuple[Path, FeatureSet]]:
    """Feature sets from feature files, ``results.json`` files, or folders holding either.

    A folder is searched recursively for ``*.features.pt`` files and for ``results.json`` files
    (:func:`feature_sets_from_results`); ``FileNotFoundError`` when a path does not exist or a
    folder holds neither. Returns ``(source file, feature set)`` pairs.
    """
    from look.analysis.results import RESULTS_FILE_NAME

    feature_files: list[Path] = []
    results_files: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            files = sorted(path.rglob(f"*{FEATURE_FILE_SUFFIX}"))
            results = sorted(path.rglob(RESULTS_FILE_NAME))
            if not files and not results:
                raise FileNotFoundError(
                    f"no feature files (*{FEATURE_FILE_SUFFIX}) and no {RESULTS_FILE_NAME} under "
                    f"{path}; write feature files with look.analysis.features.save_feature_set or "
                    "run look evaluate there"
                )
            feature_files.extend(files)
            results_files.extend(results)
        elif path.is_file():
            (results_files if path.name == RESULTS_FILE_NAME else feature_files).append(path)
        else:
            raise FileNotFoundError(f"{path} is neither a feature file nor a directory")
    pairs = [(p, load_feature_set(p)) for p in dict.fromkeys(f.resolve() for f in feature_files)]
    pairs += feature_sets_from_results(
        list(dict.fromkeys(f.resolve() for f in results_files)), split=split
    )
    return pairs
