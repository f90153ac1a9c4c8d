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
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FEATURE_FILE_SUFFIX",
    "WHOLE_SET_GROUP",
    "FeatureSet",
    "NoCoarseGroupingWarning",
    "check_fine_to_coarse",
    "collect_feature_sets",
    "feature_sets_from_results",
    "load_feature_set",
    "save_feature_set",
]

FEATURE_FILE_SUFFIX = ".features.pt"
# The one group of a feature set without coarse labels: named so that nobody reads its numbers as
# "inside a coarse class" (they cover every fine class of the dataset together).
WHOLE_SET_GROUP = "whole set (no coarse grouping)"


class NoCoarseGroupingWarning(UserWarning):
    """A feature set has no coarse labels, so its "intra-class" measures cover the whole set."""


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
    # Where the coarse labels came from (a grouping name or file); None: the feature file's own.
    grouping: str | None = None
    # The file the features were read from (a feature file or an evaluation's cache file).
    feature_file: str | None = None

    @property
    def has_coarse_grouping(self) -> bool:
        """Whether coarse labels split the set (else the measures cover the whole set)."""
        return self.coarse_labels is not None

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
            return [WHOLE_SET_GROUP]
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
        text = str(grouping_name_or_path)
        # A grouping file is recorded by its full path: two files of one name are different.
        recorded = str(Path(text).expanduser().resolve()) if text.endswith(".json") else text
        return dataclasses.replace(
            self,
            coarse_labels=fine_to_coarse[self.labels],
            coarse_names=tuple(coarse_names),
            grouping=recorded,
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
        "grouping": feature_set.grouping,
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
        grouping=payload.get("grouping") if isinstance(payload.get("grouping"), str) else None,
        feature_file=str(path.resolve()),
    )


def _is_fine_evaluation(labels: str | None) -> bool:
    return labels in (None, "", "fine")


def _cache_candidates(
    recorded: Path, results_file: Path, cache_dir: str | Path | None
) -> list[Path]:
    """Where a recorded cache file may be, in order: in ``cache_dir`` by name (the user's
    override), the recorded path, and a relative path taken from the results file's folder
    (``look evaluate`` used to record ``--cache-dir`` as typed, relative to its own cwd)."""
    recorded = recorded.expanduser()
    candidates = []
    if cache_dir is not None:
        candidates.append(Path(cache_dir).expanduser().resolve() / recorded.name)
    candidates.append(recorded.resolve())
    if not recorded.is_absolute():
        candidates.append((results_file.resolve().parent / recorded).resolve())
    return list(dict.fromkeys(candidates))


def feature_sets_from_results(
    results_files: Sequence[str | Path],
    *,
    split: str = "test",
    cache_dir: str | Path | None = None,
) -> list[tuple[Path, FeatureSet]]:
    """Feature sets of evaluations, read from the cache files their ``results.json`` record.

    For each file, ``features.<split>.cache_path`` must exist: it is looked up in ``cache_dir``
    by file name when given, then at the recorded path, then (a relative path) from the folder of
    the ``results.json``; ``FileNotFoundError`` lists the places tried. The set is named after
    the run's method label and seed; fine class names are the evaluation's class names when it
    used fine labels; coarse labels come from the dataset's shipped coarse grouping when there is
    one (else pass a grouping, see :meth:`FeatureSet.with_grouping`). Several results that share
    one cache file (one model evaluated with ``--labels fine`` and ``--labels coarse``) give one
    feature set, taken from the fine-label evaluation: a coarse one has no fine class names, so
    no grouping could apply. A set left without coarse labels gets a
    :class:`NoCoarseGroupingWarning`. Returns ``(results file, feature set)`` pairs; the cache
    file is the set's ``feature_file``.
    """
    from look.analysis.results import read_results_file
    from look.data.groupings import DATASET_COARSE_GROUPING

    # Read every file first: the choice among results sharing a cache must not depend on order.
    by_cache: dict[Path, list[tuple[Path, Any]]] = {}
    for results_file in results_files:
        results_file = Path(results_file)
        result = read_results_file(results_file)
        recorded = result.feature_caches.get(split)
        if recorded is None:
            raise FileNotFoundError(
                f"{results_file} records no feature cache for split {split!r} (features.{split}."
                "cache_path); re-run look evaluate with a feature cache, or pass feature files"
            )
        tried = _cache_candidates(recorded, results_file, cache_dir)
        cache = next((c for c in tried if c.is_file()), None)
        if cache is None:
            listed = ", ".join(str(c) for c in tried)
            raise FileNotFoundError(
                f"feature cache {recorded} recorded by {results_file} was not found; tried "
                f"{listed}. Pass the folder holding it with --cache-dir (look analyze), or "
                "re-run look evaluate to rebuild it"
            )
        by_cache.setdefault(cache, []).append((results_file, result))

    found: list[tuple[Path, FeatureSet]] = []
    for cache, candidates in by_cache.items():
        results_file, result = next(
            ((f, r) for f, r in candidates if _is_fine_evaluation(r.labels)), candidates[0]
        )
        loaded = load_feature_set(cache)
        fine_names: tuple[str, ...] = ()
        if _is_fine_evaluation(result.labels) and len(result.class_names) > int(
            loaded.labels.max()
        ):
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
        elif not fine_names:
            warnings.warn(
                NoCoarseGroupingWarning(
                    f"{results_file} evaluated with labels {result.labels!r}, so the cache "
                    f"{cache} has no fine class names and no coarse grouping can apply: "
                    f"{feature_set.name!r} will be measured over the whole set as one group. "
                    "Pass the results.json of a --labels fine evaluation"
                ),
                stacklevel=2,
            )
        found.append((results_file.resolve(), feature_set))
    return found


def collect_feature_sets(
    paths: Sequence[str | Path], *, split: str = "test", cache_dir: str | Path | None = None
) -> list[tuple[Path, FeatureSet]]:
    """Feature sets from feature files, ``results.json`` files, or folders holding either.

    A folder is searched recursively for ``*.features.pt`` files and for ``results.json`` files
    (:func:`feature_sets_from_results`); ``FileNotFoundError`` when a path does not exist or a
    folder holds neither. ``cache_dir`` is where to look for the cache files that results
    record (:func:`feature_sets_from_results`). Returns ``(source file, feature set)`` pairs: the
    feature file, or the ``results.json``.
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
        list(dict.fromkeys(f.resolve() for f in results_files)), split=split, cache_dir=cache_dir
    )
    return pairs
