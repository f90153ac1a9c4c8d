"""``look analyze``: multi-modality metrics and 2-D maps of several feature sets, written to a folder.

Output folder:

- ``multimodality.json`` — ``{"schema_version": 1, "settings": {...}, "feature_sets": [{"name",
  "source", "dataset", "model", "num_rows", "dim", "summary": {...}, "per_coarse": {...}}],
  "figures": ["maps.png", ...]}``; ``summary``/``per_coarse`` are those of
  :func:`look.analysis.multimodality.multimodality_metrics`, ``figures`` are relative to the folder.
  ``look report`` reads this file (multi-modality table, maps).
- ``maps.png`` (one figure per dataset, ``maps_<dataset>.png`` when the feature sets come from
  several datasets): one t-SNE panel per feature set (:func:`look.analysis.maps.plot_embedding_maps`).
- ``ANALYSIS.md`` — the numbers as Markdown tables, with the maps embedded.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from look.analysis.features import FeatureSet
from look.analysis.multimodality import (
    DEFAULT_K,
    DEFAULT_MAX_CLUSTERS,
    DEFAULT_MAX_PER_COARSE,
    multimodality_metrics,
)

__all__ = ["ANALYSIS_MARKDOWN", "AnalysisOutputs", "analyze_feature_sets", "resolve_coarse_classes"]

ANALYSIS_MARKDOWN = "ANALYSIS.md"
SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class AnalysisOutputs:
    """Files written by :func:`analyze_feature_sets` and the metrics of each feature set."""

    multimodality_json: Path
    markdown: Path
    figures: tuple[Path, ...]
    metrics: dict[str, dict[str, Any]]


def resolve_coarse_classes(
    requested: Sequence[int | str] | None, coarse_names: Sequence[str]
) -> list[int] | None:
    """Coarse labels from names or indices (as typed on the command line); ``None`` stays ``None``.

    ``ValueError`` lists the valid names when one is unknown.
    """
    if requested is None:
        return None
    resolved: list[int] = []
    for item in requested:
        text = str(item)
        if text in coarse_names:
            resolved.append(list(coarse_names).index(text))
        elif re.fullmatch(r"\d+", text) and int(text) < len(coarse_names):
            resolved.append(int(text))
        else:
            raise ValueError(
                f"coarse class {text!r} is neither a coarse class name nor an index < "
                f"{len(coarse_names)}; coarse classes: {list(coarse_names)}"
            )
    return list(dict.fromkeys(resolved))


def _unique_names(feature_sets: Sequence[FeatureSet]) -> list[str]:
    names: list[str] = []
    for feature_set in feature_sets:
        name, copy = feature_set.name, 2
        while name in names:
            name, copy = f"{feature_set.name} ({copy})", copy + 1
        names.append(name)
    return names


def _fmt(value: Any, percent: bool = False, digits: int = 2) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f}" if percent else f"{value:.{digits}f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "dataset"


def analyze_feature_sets(
    feature_sets: Sequence[FeatureSet],
    output_dir: str | Path,
    *,
    sources: Sequence[str | Path] | None = None,
    coarse_classes: Sequence[int | str] | None = None,
    k: int = DEFAULT_K,
    max_per_coarse: int | None = DEFAULT_MAX_PER_COARSE,
    max_clusters: int = DEFAULT_MAX_CLUSTERS,
    seed: int = 0,
    maps: bool = True,
    max_points: int | None = 2000,
    title: str = "Intra-class multi-modality",
) -> AnalysisOutputs:
    """Compute the metrics of every feature set, draw the maps, write the files listed above.

    ``coarse_classes`` (names or indices) picks the coarse classes drawn in the maps (default: see
    :func:`look.analysis.maps.plot_embedding_maps`); metrics always cover every coarse class.
    ``sources`` (same length as ``feature_sets``) are recorded in ``multimodality.json``.
    """
    if not feature_sets:
        raise ValueError("analyze needs at least one feature set")
    if sources is not None and len(sources) != len(feature_sets):
        raise ValueError(f"{len(sources)} sources for {len(feature_sets)} feature sets")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    names = _unique_names(feature_sets)

    entries: list[dict[str, Any]] = []
    metrics_by_name: dict[str, dict[str, Any]] = {}
    settings: dict[str, Any] = {}
    for name, feature_set, index in zip(names, feature_sets, range(len(names)), strict=True):
        result = multimodality_metrics(
            feature_set.features,
            feature_set.labels,
            feature_set.coarse_labels,
            coarse_names=feature_set.coarse_class_names,
            k=k,
            max_per_coarse=max_per_coarse,
            max_clusters=max_clusters,
            seed=seed,
        )
        settings = result["settings"]
        metrics_by_name[name] = result
        entries.append(
            {
                "name": name,
                "source": None if sources is None else str(sources[index]),
                "dataset": feature_set.dataset,
                "model": None if feature_set.model is None else dict(feature_set.model),
                "num_rows": int(feature_set.features.shape[0]),
                "dim": int(feature_set.features.shape[1]),
                "summary": result["summary"],
                "per_coarse": result["per_coarse"],
            }
        )

    figures: list[Path] = []
    if maps:
        figures = _draw_maps(
            feature_sets, names, output_dir, coarse_classes, seed=seed, max_points=max_points
        )

    json_path = output_dir / "multimodality.json"
    json_path.write_text(
        json.dumps(
            {
                "schema_version": SCHEMA_VERSION,
                "settings": settings,
                "feature_sets": entries,
                "figures": [f.relative_to(output_dir).as_posix() for f in figures],
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    markdown_path = output_dir / ANALYSIS_MARKDOWN
    markdown_path.write_text(_markdown(title, entries, figures, output_dir), encoding="utf-8")
    return AnalysisOutputs(
        multimodality_json=json_path,
        markdown=markdown_path,
        figures=tuple(figures),
        metrics=metrics_by_name,
    )


def _draw_maps(
    feature_sets: Sequence[FeatureSet],
    names: Sequence[str],
    output_dir: Path,
    coarse_classes: Sequence[int | str] | None,
    *,
    seed: int,
    max_points: int | None,
) -> list[Path]:
    from look.analysis.maps import plot_embedding_maps

    # Panels of one figure share their label vocabulary: group by dataset and class names.
    groups: dict[tuple[str, tuple[str, ...], tuple[str, ...]], list[int]] = {}
    for index, feature_set in enumerate(feature_sets):
        key = (
            feature_set.dataset or "",
            tuple(feature_set.fine_class_names),
            tuple(feature_set.coarse_class_names),
        )
        groups.setdefault(key, []).append(index)
    figures = []
    for (dataset, fine_names, coarse_names), members in groups.items():
        file_name = "maps.png" if len(groups) == 1 else f"maps_{_slug(dataset or 'features')}.png"
        path = output_dir / file_name
        if path in figures:  # same dataset name, different class names
            path = output_dir / f"{path.stem}_{len(figures)}.png"
        panels = {
            names[i]: (
                feature_sets[i].features,
                feature_sets[i].labels,
                feature_sets[i].coarse_labels,
            )
            for i in members
        }
        result = plot_embedding_maps(
            panels,
            coarse_classes=resolve_coarse_classes(coarse_classes, coarse_names),
            fine_names=fine_names,
            coarse_names=coarse_names,
            path=path,
            seed=seed,
            max_points=max_points,
            title=f"t-SNE of frozen features{f' — {dataset}' if dataset else ''}",
        )
        figures.append(result.path)
    return figures


def _markdown(
    title: str, entries: Sequence[dict[str, Any]], figures: Sequence[Path], output_dir: Path
) -> str:
    lines = [f"# {title}", ""]
    lines += [
        "Inside each coarse class, on frozen features: fine-label kNN purity (k nearest neighbours "
        "by cosine, leave-one-out, within the coarse class), cross-validated linear separability "
        "of the fine classes, the number of clusters found by KMeans + silhouette (1 = no "
        "substantial structure) and the adjusted Rand index (ARI) of that clustering against the "
        "fine labels. Purity and separability in %, chance levels in brackets; summaries average "
        "the coarse classes that hold several fine classes. Definitions: "
        "`look.analysis.multimodality`.",
        "",
        "## Summary",
        "",
        "| features | dataset | kNN purity | separability | clusters | ARI |",
        "|:--|:--|--:|--:|--:|--:|",
    ]
    for entry in entries:
        summary = entry["summary"]
        lines.append(
            f"| {_cell(entry['name'])} | {_cell(entry['dataset'] or '—')} | "
            f"{_fmt(summary['knn_purity'], True)} ({_fmt(summary['knn_purity_chance'], True)}) | "
            f"{_fmt(summary['separability'], True)} "
            f"({_fmt(summary['separability_chance'], True)}) | "
            f"{_fmt(summary['cluster_count'])} | {_fmt(summary['ari'], digits=3)} |"
        )
    lines += [
        "",
        "## Per coarse class",
        "",
        "| features | coarse class | rows | fine classes | kNN purity | separability | clusters | ARI |",
        "|:--|:--|--:|--:|--:|--:|--:|--:|",
    ]
    for entry in entries:
        for coarse_name, values in entry["per_coarse"].items():
            lines.append(
                f"| {_cell(entry['name'])} | {_cell(coarse_name)} | {values['num_samples']} | "
                f"{values['num_fine_classes']} | {_fmt(values['knn_purity'], True)} "
                f"({_fmt(values['knn_purity_chance'], True)}) | "
                f"{_fmt(values['separability'], True)} "
                f"({_fmt(values['separability_chance'], True)}) | "
                f"{_fmt(values['cluster_count'], digits=0)} | {_fmt(values['ari'], digits=3)} |"
            )
    if figures:
        lines += ["", "## Maps", ""]
        lines += [f"![{f.stem}]({f.relative_to(output_dir).as_posix()})" for f in figures]
    lines.append("")
    return "\n".join(lines)
