"""Intra-class multi-modality of frozen features: how much fine structure survives inside a coarse class.

LOOK's claim is that pre-training on coarse labels with a kNN objective keeps several modes per class,
where cross-entropy collapses each class to one cluster. With fine labels known for the evaluation
images (fine → coarse known), three views of that claim, computed per coarse class on frozen
features ``X`` (N × D):

(a) **fine-label kNN purity** — for each sample, the fraction of its ``k`` nearest neighbours (cosine,
    leave-one-out, neighbours searched among samples of the *same coarse class* only) that share its
    fine label, averaged over the samples. Chance level: the purity of randomly permuted fine labels,
    ``mean_i (n_{y_i} − 1) / (n − 1)``.
(b) **linear separability** — stratified ``folds``-fold (shuffled, seeded) cross-validated accuracy of a
    scikit-learn ``LogisticRegression`` on standardised features restricted to the coarse class,
    predicting the fine label. Chance level: the majority fine-class fraction.
(c) **cluster count** — rows L2-normalised (the cosine geometry of (a)), reduced by PCA to at most
    :data:`PCA_DIMS` dimensions, then KMeans (seeded) for every ``k`` in ``2 .. max_clusters``; the
    count is the ``k`` with the highest mean silhouette, or **1** when no ``k ≥ 2`` reaches
    ``silhouette_threshold`` (0.25: below it Kaufman & Rousseeuw call a clustering "no substantial
    structure"). Also reported: the adjusted Rand index (ARI) between that clustering and the fine
    labels, and the ARI of KMeans with ``k`` = number of fine classes.

Large coarse classes are subsampled (seeded, at most ``max_per_coarse`` rows each) so that a
Fashion-MNIST-sized feature set is analysed in seconds. Coarse classes holding a single fine class
have no fine structure to measure: their purity, separability and ARI are ``None``, their cluster
count is reported, and they are left out of the averages. Results are plain dicts of floats
(``None`` where undefined), ready for ``json.dump``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from look.analysis._threads import single_threaded_native_pools
from look.analysis.features import WHOLE_SET_GROUP, check_fine_to_coarse
from look.search import check_positive_int, knn_search

__all__ = [
    "DEFAULT_K",
    "DEFAULT_MAX_CLUSTERS",
    "DEFAULT_MAX_PER_COARSE",
    "PCA_DIMS",
    "SILHOUETTE_THRESHOLD",
    "ClusterEstimate",
    "SmallSampleWarning",
    "estimate_cluster_count",
    "knn_label_purity",
    "knn_purity_chance",
    "linear_separability",
    "multimodality_metrics",
]

DEFAULT_K = 10
DEFAULT_MAX_PER_COARSE = 2000
DEFAULT_MAX_CLUSTERS = 6
DEFAULT_FOLDS = 3
SILHOUETTE_THRESHOLD = 0.25
PCA_DIMS = 50
# Queries per knn_search call and memory rows per chunk: bounds the similarity block to 8M floats.
_QUERY_BLOCK = 1024
_MEMORY_CHUNK = 8192

ArrayLike = Tensor | np.ndarray


class SmallSampleWarning(UserWarning):
    """A coarse class (or its subsample) is too small for a measure to mean much: ``k`` capped,
    fine classes lost to the subsample, or too few rows per fine class."""


def _as_numpy_features(features: ArrayLike, name: str = "features") -> np.ndarray:
    array = (
        features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    )
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            f"{name} must be a 2-D float array (N, D), got {array.dtype} {array.shape}"
        )
    finite = np.isfinite(array)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        shown = ", ".join(str(i) for i in bad_rows[:5].tolist())
        more = f" and {bad_rows.size - 5} more" if bad_rows.size > 5 else ""
        raise ValueError(
            f"{name} contain NaN or inf in {bad_rows.size} of {array.shape[0]} rows (rows "
            f"{shown}{more}); check the feature extraction"
        )
    return array.astype(np.float32, copy=False)


def _as_numpy_labels(labels: ArrayLike, rows: int, name: str) -> np.ndarray:
    array = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if array.ndim != 1 or array.shape[0] != rows:
        raise ValueError(f"{name} must be 1-D of length {rows}, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def knn_label_purity(features: ArrayLike, labels: ArrayLike, *, k: int = DEFAULT_K) -> float:
    """Mean fraction of each row's ``k`` cosine nearest neighbours (itself excluded) with its label.

    ``k`` is capped at ``N − 1``. Uses :func:`look.search.knn_search` in blocks of queries, so memory
    stays bounded for any ``N``. ``ValueError`` when there are fewer than 2 rows.

    Saturation: a row of a class with ``n_f`` images has at most ``n_f − 1`` same-label
    neighbours, so its agreement is at most ``min(k, n_f − 1) / k``; a small class (``n_f ≤ k``)
    reaches at most ``(n_f − 1) / k`` even when perfectly separated, and the purity is at most
    ``mean_i min(k, n_{y_i} − 1) / k``. Compare sets whose classes have more than ``k`` images, or
    read the value against that bound.
    """
    k = check_positive_int(k)
    array = _as_numpy_features(features)
    label_array = _as_numpy_labels(labels, array.shape[0], "labels")
    rows = array.shape[0]
    if rows < 2:
        raise ValueError(f"kNN purity needs at least 2 rows, got {rows}")
    k = min(k, rows - 1)
    memory = torch.nn.functional.normalize(torch.from_numpy(array), dim=1)
    label_tensor = torch.from_numpy(label_array)
    agreement_sum = 0.0
    for start in range(0, rows, _QUERY_BLOCK):
        stop = min(start + _QUERY_BLOCK, rows)
        result = knn_search(
            memory[start:stop],
            memory,
            k,
            query_ids=torch.arange(start, stop),  # leave-one-out: a row is not its own neighbour
            chunk_size=_MEMORY_CHUNK,
            check_finite=False,  # (_as_numpy_features refused non-finite rows once)
        )
        neighbour_labels = label_tensor[result.indices]
        same = neighbour_labels == label_tensor[start:stop].unsqueeze(1)
        agreement_sum += same.double().mean(dim=1).sum().item()
    return agreement_sum / rows


def knn_purity_chance(labels: ArrayLike) -> float:
    """Expected kNN purity when labels are independent of the features: ``mean_i (n_{y_i}−1)/(n−1)``."""
    label_array = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels).astype(
        np.int64
    )
    rows = label_array.shape[0]
    if rows < 2:
        raise ValueError(f"chance purity needs at least 2 labels, got {rows}")
    _, counts = np.unique(label_array, return_counts=True)
    # Sum over classes of n_c * (n_c - 1) / (n - 1), divided by n.
    return float((counts * (counts - 1)).sum() / (rows * (rows - 1)))


def linear_separability(
    features: ArrayLike,
    labels: ArrayLike,
    *,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    max_iter: int = 1000,
) -> tuple[float, float] | None:
    """Cross-validated accuracy of a logistic regression predicting ``labels``, and its chance level.

    Standardisation is fitted inside each training fold (a pipeline), folds are stratified and
    shuffled with ``seed``. The number of folds is lowered to the size of the smallest class when
    needed. Returns ``(accuracy, majority_fraction)``, or ``None`` when there are fewer than two
    classes or a class has a single sample (no stratified split exists).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = check_positive_int(folds, "folds")
    array = _as_numpy_features(features)
    label_array = _as_numpy_labels(labels, array.shape[0], "labels")
    _, counts = np.unique(label_array, return_counts=True)
    splits = min(folds, int(counts.min())) if counts.size else 0
    if counts.size < 2 or splits < 2:
        return None
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    splitter = StratifiedKFold(n_splits=splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings(), single_threaded_native_pools():
        # A probe that stops at max_iter still measures separability; the warning is noise here.
        warnings.simplefilter("ignore", ConvergenceWarning)
        scores = cross_val_score(classifier, array, label_array, cv=splitter)
    return float(scores.mean()), float(counts.max() / counts.sum())


@dataclasses.dataclass(frozen=True)
class ClusterEstimate:
    """Result of :func:`estimate_cluster_count`.

    ``count`` is the chosen number of clusters, ``assignments`` the cluster of each row under it
    (all zeros for ``count == 1``), ``silhouettes`` the mean silhouette of KMeans for each ``k ≥ 2``
    tried, and ``kmeans_assignments`` the KMeans clustering for each of those ``k``.
    """

    count: int
    assignments: np.ndarray
    silhouettes: dict[int, float]
    kmeans_assignments: dict[int, np.ndarray]

    @property
    def best_silhouette(self) -> float | None:
        """The highest silhouette over the ``k`` tried (``None`` when none could be tried)."""
        return max(self.silhouettes.values()) if self.silhouettes else None


def _cluster_space(array: np.ndarray, pca_dims: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    norms = np.linalg.norm(array, axis=1, keepdims=True)
    unit_rows = array / np.maximum(norms, 1e-12)
    components = min(pca_dims, unit_rows.shape[0] - 1, unit_rows.shape[1])
    if components < unit_rows.shape[1] and components >= 2:
        return PCA(n_components=components, random_state=seed).fit_transform(unit_rows)
    return unit_rows - unit_rows.mean(axis=0, keepdims=True)


def estimate_cluster_count(
    features: ArrayLike,
    *,
    max_clusters: int = DEFAULT_MAX_CLUSTERS,
    seed: int = 0,
    silhouette_threshold: float = SILHOUETTE_THRESHOLD,
    pca_dims: int = PCA_DIMS,
    extra_counts: Sequence[int] = (),
) -> ClusterEstimate:
    """Number of modes by the KMeans silhouette rule described in the module docstring.

    ``extra_counts`` asks for KMeans clusterings at further ``k`` (e.g. the number of fine classes)
    without letting them take part in the choice; they appear in ``kmeans_assignments``.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    max_clusters = check_positive_int(max_clusters, "max_clusters")
    if max_clusters < 2:  # no count to choose: every class would read as one cluster
        raise ValueError(f"max_clusters must be at least 2, got {max_clusters}")
    array = _as_numpy_features(features)
    rows = array.shape[0]
    single = np.zeros(rows, dtype=np.int64)
    if rows < 3:
        return ClusterEstimate(1, single, {}, {})
    candidates = range(2, min(max_clusters, rows - 1) + 1)
    wanted = sorted(set(candidates) | {c for c in extra_counts if 2 <= c <= rows - 1})
    silhouettes: dict[int, float] = {}
    assignments: dict[int, np.ndarray] = {}
    with single_threaded_native_pools():
        space = _cluster_space(array, pca_dims, seed)
        for clusters in wanted:
            model = KMeans(n_clusters=clusters, n_init=4, random_state=seed)
            labels = model.fit_predict(space).astype(np.int64)
            assignments[clusters] = labels
            if clusters not in candidates:
                continue
            # KMeans can return fewer distinct clusters than asked on degenerate data.
            distinct = np.unique(labels).size
            silhouettes[clusters] = (
                float(silhouette_score(space, labels)) if 2 <= distinct <= rows - 1 else -1.0
            )
    if not silhouettes:
        return ClusterEstimate(1, single, silhouettes, assignments)
    best = max(silhouettes, key=lambda c: (silhouettes[c], -c))  # ties: fewer clusters
    if silhouettes[best] < silhouette_threshold:
        return ClusterEstimate(1, single, silhouettes, assignments)
    return ClusterEstimate(best, assignments[best], silhouettes, assignments)


def _subsample(indices: np.ndarray, limit: int | None, seed: int, group: int) -> np.ndarray:
    if limit is None or indices.size <= limit:
        return indices
    generator = np.random.default_rng([seed, group])  # per-group stream: independent of the others
    return np.sort(generator.choice(indices, size=limit, replace=False))


def _coarse_metrics(
    features: np.ndarray,
    fine: np.ndarray,
    *,
    k: int,
    folds: int,
    max_clusters: int,
    silhouette_threshold: float,
    seed: int,
) -> dict[str, Any]:
    from sklearn.metrics import adjusted_rand_score

    num_fine = int(np.unique(fine).size)
    metrics: dict[str, Any] = {
        "num_samples": int(fine.size),
        "num_fine_classes_sampled": num_fine,
        "k_effective": min(k, max(int(fine.size) - 1, 0)),
        "knn_purity": None,
        "knn_purity_chance": None,
        "separability": None,
        "separability_chance": None,
        "cluster_count": None,
        "cluster_silhouette": None,
        "ari": None,
        "ari_at_fine_count": None,
    }
    clusters = estimate_cluster_count(
        features,
        max_clusters=max_clusters,
        seed=seed,
        silhouette_threshold=silhouette_threshold,
        extra_counts=(num_fine,),
    )
    metrics["cluster_count"] = float(clusters.count)
    metrics["cluster_silhouette"] = clusters.best_silhouette
    if num_fine < 2:
        return metrics
    metrics["knn_purity"] = knn_label_purity(features, fine, k=k)
    metrics["knn_purity_chance"] = knn_purity_chance(fine)
    separability = linear_separability(features, fine, folds=folds, seed=seed)
    if separability is not None:
        metrics["separability"], metrics["separability_chance"] = separability
    metrics["ari"] = float(adjusted_rand_score(fine, clusters.assignments))
    if num_fine in clusters.kmeans_assignments:
        metrics["ari_at_fine_count"] = float(
            adjusted_rand_score(fine, clusters.kmeans_assignments[num_fine])
        )
    return metrics


def _small_sample_notes(
    entry: dict[str, Any], sampled_fine: np.ndarray, *, k: int, folds: int
) -> list[str]:
    """Why a coarse class's measures say little: its sample is too small for them."""
    notes = []
    if entry["num_fine_classes"] < 2:
        return notes  # nothing fine-grained is measured there
    if entry["num_fine_classes_sampled"] < entry["num_fine_classes"]:
        notes.append(
            f"the subsample of {entry['num_samples']} of {entry['num_rows']} rows holds "
            f"{entry['num_fine_classes_sampled']} of its {entry['num_fine_classes']} fine "
            "classes (raise --max-per-coarse)"
        )
    if entry["num_fine_classes_sampled"] < 2:
        return notes  # nothing was measured: the other notes would not apply
    if entry["k_effective"] < k:
        notes.append(
            f"only {entry['num_samples']} rows measured, so kNN purity used k = "
            f"{entry['k_effective']} instead of {k}: with every other row a neighbour, purity "
            "equals its chance level by construction"
        )
    _, counts = np.unique(sampled_fine, return_counts=True)
    k_used = entry["k_effective"]
    if k_used == k and int(counts.min()) <= k:
        # A row has at most n_f − 1 neighbours of its class: knn_label_purity's own bound.
        ceiling = float(np.sum(counts * np.minimum(k, counts - 1)) / (k * counts.sum()))
        notes.append(
            f"the smallest fine class has {int(counts.min())} rows, not more than k = {k}, so "
            f"kNN purity cannot exceed {100 * ceiling:.1f} % here even for perfectly separated "
            "classes (lower --k, or raise --max-per-coarse)"
        )
    if counts.size >= 2 and int(counts.min()) < 2:
        notes.append(
            "a fine class has a single row in the sample, so linear separability is undefined"
        )
    elif counts.size >= 2 and int(counts.min()) < folds:
        notes.append(
            f"the smallest fine class has {int(counts.min())} rows, fewer than the {folds} folds "
            "of linear separability"
        )
    return notes


SUMMARY_KEYS = (
    "knn_purity",
    "knn_purity_chance",
    "separability",
    "separability_chance",
    "cluster_count",
    "ari",
    "ari_at_fine_count",
)


def multimodality_metrics(
    features: ArrayLike,
    fine_labels: ArrayLike,
    coarse_labels: ArrayLike | None = None,
    *,
    coarse_names: Sequence[str] | None = None,
    k: int = DEFAULT_K,
    max_per_coarse: int | None = DEFAULT_MAX_PER_COARSE,
    max_clusters: int = DEFAULT_MAX_CLUSTERS,
    folds: int = DEFAULT_FOLDS,
    silhouette_threshold: float = SILHOUETTE_THRESHOLD,
    seed: int = 0,
    name: str | None = None,
) -> dict[str, Any]:
    """All multi-modality metrics of the module docstring, per coarse class and averaged.

    Args:
        features: ``(N, D)`` frozen features.
        fine_labels: ``(N,)`` fine labels.
        coarse_labels: ``(N,)`` coarse labels (each fine class in exactly one coarse class);
            ``None`` treats the whole set as one coarse class.
        coarse_names: name of each coarse label (default ``"group i"``).
        k, folds, max_clusters, silhouette_threshold: see the module docstring.
        max_per_coarse: at most this many rows per coarse class (seeded subsample); ``None``: all.
        seed: seeds the subsample, the CV folds, PCA and KMeans.
        name: what the features are (a feature set and its file), for error messages and
            warnings.

    Returns:
        ``{"per_coarse": {coarse_name: {metric: float | None, "num_samples": int,
        "num_fine_classes": int, "num_rows": int, "num_fine_classes_sampled": int,
        "k_effective": int, "warnings": [str], "coarse_label": int}}, "summary": {metric: float | None,
        "num_coarse_classes": int, "num_coarse_classes_with_several_fine": int}, "settings": {...}}``
        where the metrics are ``knn_purity``, ``knn_purity_chance``, ``separability``,
        ``separability_chance``, ``cluster_count``, ``cluster_silhouette``, ``ari`` and
        ``ari_at_fine_count``; a summary value is the unweighted mean over the coarse classes that
        hold several fine classes (all coarse classes when none does) where the metric is defined
        (``None`` when it is nowhere). ``num_fine_classes``/``num_rows`` count the data,
        ``num_samples``/``num_fine_classes_sampled`` the (sub)sample measured; ``warnings`` say
        where the sample is too small for a measure to mean much (also a
        :class:`SmallSampleWarning`). ``settings["scope"]`` is ``"intra-coarse"``, or
        ``"whole-set"`` without coarse labels (one group named
        :data:`look.analysis.features.WHOLE_SET_GROUP`).
    """
    k = check_positive_int(k)
    if max_per_coarse is not None:
        max_per_coarse = check_positive_int(max_per_coarse, "max_per_coarse")
    subject = f"features of {name}" if name else "features"
    array = _as_numpy_features(features, subject)
    fine = _as_numpy_labels(fine_labels, array.shape[0], "fine_labels")
    if coarse_labels is None:
        coarse = np.zeros_like(fine)
        coarse_names = coarse_names or [WHOLE_SET_GROUP]
    else:
        coarse = _as_numpy_labels(coarse_labels, array.shape[0], "coarse_labels")
        check_fine_to_coarse(fine, coarse)
    present = np.unique(coarse)
    if coarse_names is not None and present.size and int(present.max()) >= len(coarse_names):
        raise ValueError(
            f"coarse label {int(present.max())} has no name ({len(coarse_names)} coarse_names given)"
        )

    per_coarse: dict[str, dict[str, Any]] = {}
    for coarse_label in present.tolist():
        members = np.flatnonzero(coarse == coarse_label)
        rows = _subsample(members, max_per_coarse, seed, coarse_label)
        group = coarse_names[coarse_label] if coarse_names is not None else f"group {coarse_label}"
        entry = _coarse_metrics(
            array[rows],
            fine[rows],
            k=k,
            folds=folds,
            max_clusters=max_clusters,
            silhouette_threshold=silhouette_threshold,
            seed=seed,
        )
        # The data's counts, not the subsample's: a subsample of 1 row per coarse class would
        # report a single fine class for a coarse class that has several.
        entry["num_rows"] = int(members.size)
        entry["num_fine_classes"] = int(np.unique(fine[members]).size)
        entry["warnings"] = _small_sample_notes(entry, fine[rows], k=k, folds=folds)
        for note in entry["warnings"]:
            warnings.warn(
                SmallSampleWarning(f"{name or 'features'}, {group}: {note}"), stacklevel=2
            )
        per_coarse[group] = {"coarse_label": int(coarse_label), **entry}

    # Averages cover the coarse classes with fine structure to measure (all when there are none),
    # so that a one-fine-class group (e.g. Fashion-MNIST's "Bags") does not pull cluster counts down.
    several_fine = [e for e in per_coarse.values() if e["num_fine_classes"] >= 2]
    pool = several_fine or list(per_coarse.values())
    summary: dict[str, Any] = {}
    for key in SUMMARY_KEYS:
        values = [entry[key] for entry in pool if entry[key] is not None]
        summary[key] = float(np.mean(values)) if values else None
    summary["num_coarse_classes"] = len(per_coarse)
    summary["num_coarse_classes_with_several_fine"] = len(several_fine)
    settings = {
        "scope": "whole-set" if coarse_labels is None else "intra-coarse",
        "k": k,
        "max_per_coarse": max_per_coarse,
        "max_clusters": max_clusters,
        "folds": folds,
        "silhouette_threshold": silhouette_threshold,
        "pca_dims": PCA_DIMS,
        "seed": seed,
    }
    return {"per_coarse": per_coarse, "summary": summary, "settings": settings}
