"""``look analyze``: multi-modality metrics and 2-D maps of several feature sets, written to a folder.

Output folder:

- ``multimodality.json`` — ``{"schema_version": 1, "settings": {...}, "feature_sets": [{"name",
  "source", "feature_file", "dataset", "model", "scope", "grouping", "num_rows", "dim",
  "summary": {...}, "per_coarse": {...}}], "figures": ["maps.png", ...]}``; ``summary``/
  ``per_coarse`` are those of :func:`look.analysis.multimodality.multimodality_metrics`,
  ``figures`` are relative to the folder. ``source`` is the file given (a feature file or a
  ``results.json``), ``feature_file`` the file the features were read from; ``scope`` is
  ``"whole-set"`` for a feature set without coarse labels. ``settings`` holds the metrics'
  settings and ``"maps"``: ``max_points``, ``perplexity``, ``seed`` and per figure the coarse
  classes drawn, the points per panel out of the rows available, and the caption.
  ``look report`` reads this file (multi-modality table, maps).
- ``maps.png`` (one figure per dataset, ``maps_<dataset>.png`` when the feature sets come from
  several datasets): one t-SNE panel per feature set (:func:`look.analysis.maps.plot_embedding_maps`).
- ``ANALYSIS.md`` — the numbers as Markdown tables, with the maps embedded.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from look.analysis.features import WHOLE_SET_GROUP, FeatureSet, NoCoarseGroupingWarning
from look.analysis.maps import DEFAULT_PERPLEXITY
from look.analysis.multimodality import (
    DEFAULT_K,
    DEFAULT_MAX_CLUSTERS,
    DEFAULT_MAX_PER_COARSE,
    multimodality_metrics,
)
from look.atomic import atomic_write_text

__all__ = [
    "ANALYSIS_MARKDOWN",
    "AnalysisOutputs",
    "MapsFailedError",
    "analyze_feature_sets",
    "resolve_coarse_classes",
    "settings_line",
]

ANALYSIS_MARKDOWN = "ANALYSIS.md"
SCHEMA_VERSION = 1


class MapsFailedError(ValueError):
    """The maps failed after the metrics were written (a ``ValueError``, so that the command line
    shows it as one message)."""


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


def _map_groups(
    feature_sets: Sequence[FeatureSet],
) -> dict[tuple[str, tuple[str, ...], tuple[str, ...]], list[int]]:
    """Feature sets drawn in one figure: panels of one figure share their label vocabulary."""
    groups: dict[tuple[str, tuple[str, ...], tuple[str, ...]], list[int]] = {}
    for index, feature_set in enumerate(feature_sets):
        key = (
            feature_set.dataset or "",
            tuple(feature_set.fine_class_names),
            tuple(feature_set.coarse_class_names),
        )
        groups.setdefault(key, []).append(index)
    return groups


def _owned_figures(output_dir: Path) -> list[Path]:
    """Maps an earlier ``look analyze`` wrote here: those its multimodality.json lists, and the
    ``maps*.png`` names this command gives its figures."""
    # Resolved paths: a relative folder's glob and the listed names must meet as one file (a
    # re-run into a relative --output unlinked it twice and failed).
    owned = {
        path.resolve()
        for pattern in ("maps.png", "maps_*.png")
        for path in output_dir.glob(pattern)
    }
    previous = output_dir / "multimodality.json"
    if previous.is_file():
        try:
            listed = json.loads(previous.read_text(encoding="utf-8")).get("figures") or []
        except (ValueError, AttributeError):
            listed = []
        for name in listed:
            candidate = (output_dir / str(name)).resolve()
            # Only files inside the folder: a hand-edited list must not reach elsewhere.
            if candidate.parent == output_dir.resolve() and candidate.suffix == ".png":
                owned.add(candidate)
    return sorted(p for p in owned if p.is_file())


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
    perplexity: float = DEFAULT_PERPLEXITY,
    title: str = "Intra-class multi-modality",
) -> AnalysisOutputs:
    """Compute the metrics of every feature set, draw the maps, write the files listed above.

    ``coarse_classes`` (names or indices) picks the coarse classes drawn in the maps (default: see
    :func:`look.analysis.maps.plot_embedding_maps`); metrics always cover every coarse class.
    ``sources`` (same length as ``feature_sets``) are recorded in ``multimodality.json``.
    Arguments are checked before any metric is computed; the metrics are written before the maps
    are drawn, so a map that fails (:class:`MapsFailedError` naming the files written) loses no
    metric.
    Maps of an earlier run in ``output_dir`` are removed first. A feature set without coarse
    labels is measured over its whole set as one group, with a :class:`NoCoarseGroupingWarning`.
    """
    if not feature_sets:
        raise ValueError("analyze needs at least one feature set")
    if sources is not None and len(sources) != len(feature_sets):
        raise ValueError(f"{len(sources)} sources for {len(feature_sets)} feature sets")
    if maps and max_points is not None and max_points < 4:
        raise ValueError(
            f"max_points (--max-points) must be at least 4, t-SNE's minimum, or None (0 on the "
            f"command line) for all rows; got {max_points}"
        )
    groups = _map_groups(feature_sets)
    # A typo in the coarse classes fails now, not after minutes of metrics.
    drawn_coarse = {
        key: resolve_coarse_classes(coarse_classes, key[2]) if maps else None for key in groups
    }
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    names = _unique_names(feature_sets)

    entries: list[dict[str, Any]] = []
    metrics_by_name: dict[str, dict[str, Any]] = {}
    settings: dict[str, Any] = {}
    for name, feature_set, index in zip(names, feature_sets, range(len(names)), strict=True):
        source = None if sources is None else str(sources[index])
        origin = source or feature_set.feature_file
        if not feature_set.has_coarse_grouping:
            warnings.warn(
                NoCoarseGroupingWarning(
                    f"{name!r}{f' ({origin})' if origin else ''} has no coarse labels "
                    f"(dataset {feature_set.dataset or 'unknown'} ships no grouping, or its "
                    "fine class names are unknown): its measures cover the whole set as one "
                    f"group, {WHOLE_SET_GROUP!r}, not fine classes inside coarse ones. Pass "
                    "--grouping to measure inside coarse classes"
                ),
                stacklevel=2,
            )
        result = multimodality_metrics(
            feature_set.features,
            feature_set.labels,
            feature_set.coarse_labels,
            coarse_names=feature_set.coarse_class_names,
            k=k,
            max_per_coarse=max_per_coarse,
            max_clusters=max_clusters,
            seed=seed,
            name=f"feature set {name!r}{f' from {origin}' if origin else ''}",
        )
        # Scope and grouping differ per feature set; the rest is this call's, shared by all.
        settings = {key: v for key, v in result["settings"].items() if key != "scope"}
        metrics_by_name[name] = result
        entries.append(
            {
                "name": name,
                "source": source,
                "feature_file": feature_set.feature_file,
                "dataset": feature_set.dataset,
                "model": None if feature_set.model is None else dict(feature_set.model),
                "scope": result["settings"]["scope"],
                "grouping": feature_set.grouping,
                "num_rows": int(feature_set.features.shape[0]),
                "dim": int(feature_set.features.shape[1]),
                "summary": result["summary"],
                "per_coarse": result["per_coarse"],
            }
        )
    settings["maps"] = (
        {"max_points": max_points, "perplexity": perplexity, "seed": seed, "figures": []}
        if maps
        else None
    )

    stale = _owned_figures(output_dir)
    for path in stale:
        path.unlink(missing_ok=True)
    json_path = output_dir / "multimodality.json"
    markdown_path = output_dir / ANALYSIS_MARKDOWN
    # Metrics first: a map that fails afterwards keeps them.
    _write_outputs(json_path, markdown_path, title, settings, entries, [], output_dir)

    figures: list[Path] = []
    if maps:
        try:
            drawn = _draw_maps(
                feature_sets,
                names,
                output_dir,
                groups,
                drawn_coarse,
                seed=seed,
                max_points=max_points,
                perplexity=perplexity,
            )
        except Exception as error:
            raise MapsFailedError(
                f"the metrics are written ({json_path}, {markdown_path}), but a map failed: "
                f"{error}. Re-run with --no-maps (maps=False) to skip the maps, or change "
                "--coarse-classes/--max-points"
            ) from error
        figures = [path for path, _ in drawn]
        settings["maps"]["figures"] = [info for _, info in drawn]
        _write_outputs(json_path, markdown_path, title, settings, entries, figures, output_dir)
    return AnalysisOutputs(
        multimodality_json=json_path,
        markdown=markdown_path,
        figures=tuple(figures),
        metrics=metrics_by_name,
    )


def _write_outputs(
    json_path: Path,
    markdown_path: Path,
    title: str,
    settings: dict[str, Any],
    entries: Sequence[dict[str, Any]],
    figures: Sequence[Path],
    output_dir: Path,
) -> None:
    # Atomic: `look report` reads the JSON back, and a kill or a full disk mid-write must leave
    # the previous analysis, not half a file.
    atomic_write_text(
        json_path,
        json.dumps(
            {
                "schema_version": SCHEMA_VERSION,
                "settings": settings,
                "feature_sets": list(entries),
                "figures": [f.relative_to(output_dir).as_posix() for f in figures],
            },
            indent=2,
        )
        + "\n",
    )
    atomic_write_text(markdown_path, _markdown(title, settings, entries, figures, output_dir))


def _draw_maps(
    feature_sets: Sequence[FeatureSet],
    names: Sequence[str],
    output_dir: Path,
    groups: dict[tuple[str, tuple[str, ...], tuple[str, ...]], list[int]],
    drawn_coarse: dict[tuple[str, tuple[str, ...], tuple[str, ...]], list[int] | None],
    *,
    seed: int,
    max_points: int | None,
    perplexity: float,
) -> list[tuple[Path, dict[str, Any]]]:
    """Each figure's path and what it shows (for multimodality.json's settings)."""
    from look.analysis.maps import plot_embedding_maps

    figures: list[tuple[Path, dict[str, Any]]] = []
    for key, members in groups.items():
        dataset, fine_names, coarse_names = key
        file_name = "maps.png" if len(groups) == 1 else f"maps_{_slug(dataset or 'features')}.png"
        path = output_dir / file_name
        if path in [f for f, _ in figures]:  # same dataset name, different class names
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
            coarse_classes=drawn_coarse[key],
            fine_names=fine_names,
            coarse_names=coarse_names,
            path=path,
            seed=seed,
            max_points=max_points,
            perplexity=perplexity,
            title=f"t-SNE of frozen features{f' — {dataset}' if dataset else ''}",
        )
        figures.append(
            (
                result.path,
                {
                    "file": result.path.relative_to(output_dir).as_posix(),
                    "coarse_classes": [coarse_names[c] for c in result.coarse_classes],
                    "points_per_panel": {n: int(r.size) for n, r in result.rows.items()},
                    "rows_available_per_panel": dict(result.available),
                    "caption": result.caption,
                },
            )
        )
    return figures


def settings_line(settings: Mapping[str, Any]) -> str:
    """The analysis settings in words (ANALYSIS.md, and REPORT.md per settings group)."""
    per_coarse = settings.get("max_per_coarse")
    parts = [
        f"kNN k = {settings.get('k')}",
        f"at most {per_coarse} rows per coarse class (seeded subsample)"
        if per_coarse
        else "every row of each coarse class",
        f"{settings.get('folds')}-fold separability",
        f"clusters 2..{settings.get('max_clusters')} by silhouette ≥ "
        f"{settings.get('silhouette_threshold')} after PCA to {settings.get('pca_dims')} dims",
        f"seed {settings.get('seed')}",
    ]
    return ", ".join(parts)


def _rows_cell(values: Mapping[str, Any]) -> str:
    total = values.get("num_rows")
    used = values["num_samples"]
    return str(used) if total is None or total == used else f"{used} of {total}"


def _markdown(
    title: str,
    settings: Mapping[str, Any],
    entries: Sequence[dict[str, Any]],
    figures: Sequence[Path],
    output_dir: Path,
) -> str:
    lines = [f"# {title}", ""]
    lines += [
        "Inside each coarse class, on frozen features: fine-label kNN purity (k nearest neighbours "
        "by cosine, leave-one-out, within the coarse class), cross-validated linear separability "
        "of the fine classes, the number of clusters found by KMeans + silhouette (1 = no "
        "substantial structure) and the adjusted Rand index (ARI) against the fine labels: of "
        "KMeans with k = the number of fine classes (*ARI at fine count*, the headline: it "
        "asks whether the fine classes can be found as clusters, whatever the silhouette says) "
        "and of the silhouette-chosen clustering (*ARI chosen*: 0 whenever 1 cluster is "
        "chosen). Purity and separability in %, chance levels in brackets; the chance level of "
        "either ARI is 0 (random clusters score ≈ 0, identical ones 1). Summaries average the "
        "coarse classes that hold several fine classes. Definitions: "
        "`look.analysis.multimodality`.",
        "",
        f"Settings: {settings_line(settings)}.",
        "",
    ]
    whole = [e["name"] for e in entries if e.get("scope") == "whole-set"]
    if whole:
        lines += [
            f"**No coarse grouping** for {', '.join(f'`{_cell(n)}`' for n in whole)}: their "
            "measures cover the whole set as one group (all fine classes together), not fine "
            "classes inside coarse classes; pass `--grouping` to measure inside coarse classes.",
            "",
        ]
    lines += [
        "## Summary",
        "",
        "| features | dataset | scope | kNN purity | separability | clusters | "
        "ARI at fine count | ARI chosen |",
        "|:--|:--|:--|--:|--:|--:|--:|--:|",
    ]
    for entry in entries:
        summary = entry["summary"]
        scope = "whole set" if entry.get("scope") == "whole-set" else "per coarse class"
        lines.append(
            f"| {_cell(entry['name'])} | {_cell(entry['dataset'] or '—')} | {scope} | "
            f"{_fmt(summary['knn_purity'], True)} ({_fmt(summary['knn_purity_chance'], True)}) | "
            f"{_fmt(summary['separability'], True)} "
            f"({_fmt(summary['separability_chance'], True)}) | "
            f"{_fmt(summary['cluster_count'])} | "
            f"{_fmt(summary.get('ari_at_fine_count'), digits=3)} (0) | "
            f"{_fmt(summary['ari'], digits=3)} (0) |"
        )
    lines += [
        "",
        "## Per coarse class",
        "",
        "Rows: measured (of the class's rows, when subsampled); fine classes: of the data.",
        "",
        "| features | coarse class | rows | fine classes | kNN purity | separability | clusters | "
        "ARI at fine count | ARI chosen |",
        "|:--|:--|--:|--:|--:|--:|--:|--:|--:|",
    ]
    notes: list[str] = []
    for entry in entries:
        for coarse_name, values in entry["per_coarse"].items():
            mark = ""
            for note in values.get("warnings") or []:
                notes.append(note)
                mark += f" [{len(notes)}]"
            lines.append(
                f"| {_cell(entry['name'])} | {_cell(coarse_name)}{mark} | {_rows_cell(values)} | "
                f"{values['num_fine_classes']} | {_fmt(values['knn_purity'], True)} "
                f"({_fmt(values['knn_purity_chance'], True)}) | "
                f"{_fmt(values['separability'], True)} "
                f"({_fmt(values['separability_chance'], True)}) | "
                f"{_fmt(values['cluster_count'], digits=0)} | "
                f"{_fmt(values.get('ari_at_fine_count'), digits=3)} | "
                f"{_fmt(values['ari'], digits=3)} |"
            )
    if notes:
        lines += ["", "Small samples (read these rows with care):", ""]
        lines += [f"{i}. {_cell(note)}" for i, note in enumerate(notes, start=1)]
    if figures:
        maps = settings.get("maps") or {}
        lines += ["", "## Maps", ""]
        captions = {info["file"]: info.get("caption") for info in maps.get("figures") or []}
        for figure in figures:
            relative = figure.relative_to(output_dir).as_posix()
            lines.append(f"![{figure.stem}]({relative})")
            if captions.get(relative):
                lines += ["", f"*{captions[relative]}.*", ""]
    lines.append("")
    return "\n".join(lines)
