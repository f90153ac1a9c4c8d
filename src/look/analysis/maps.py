"""Figures: Figure-1 style 2-D maps of a few coarse classes per method, and bar charts for reports.

Maps: for each panel (one method or checkpoint), the rows of the chosen coarse classes are
subsampled (seeded), L2-normalised (the cosine geometry of kNN evaluation), reduced by PCA to at most
50 dimensions and embedded in 2-D by scikit-learn's t-SNE (PCA initialisation, seeded), so the same
inputs give the same coordinates. Points are coloured by fine label: each coarse class has its own
hue family (blues, oranges, greens, purples, ...) and its fine classes get distinct shades of it, so a method
that keeps fine structure inside a coarse class shows separate shades, one that collapses the class
shows them mixed (with a single coarse class, e.g. data without a grouping, fine classes get
distinct hues). Shades of one hue are hard to tell apart as small dots (Coat vs Shirt), so the fine
classes of a coarse class also get distinct marker shapes (circle, square, triangle, ...; same
order every time). One legend (fine names under their coarse name, with colour and shape) serves
all panels, and the figure's caption says what was drawn: points per panel out of how many, the
seed, the perplexity and the coarse classes.

Everything draws on ``matplotlib.figure.Figure`` objects with the Agg canvas: no pyplot state, no
display needed, and the caller's matplotlib backend is left alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from look.analysis._threads import single_threaded_native_pools
from look.analysis.features import check_fine_to_coarse

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DEFAULT_MAX_POINTS",
    "DEFAULT_PERPLEXITY",
    "EmbeddingMaps",
    "fine_class_colours",
    "fine_class_markers",
    "metric_bars_figure",
    "plot_embedding_maps",
    "plot_metric_bars",
    "select_map_rows",
    "tsne_embedding",
]

DEFAULT_MAX_POINTS = 2000
DEFAULT_PERPLEXITY = 30.0
# Without an explicit choice, maps show every coarse class when there are few, else the first few
# that have several fine classes (a 20-superclass legend of 100 shades is unreadable).
_DEFAULT_COARSE_LIMIT = 6
_DEFAULT_COARSE_PICK = 4
# Ordered so that neighbouring coarse classes get far-apart hues (oranges and reds not side by side).
_HUE_FAMILIES = (
    "Blues",
    "Oranges",
    "Greens",
    "Purples",
    "Reds",
    "Greys",
    "YlOrBr",
    "PuRd",
    "BuGn",
    "RdPu",
)
# Filled shapes that stay distinct at a few points across; cycled within a coarse class.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_PANEL_INCHES = 4.6
_DPI = 120

ArrayLike = Tensor | np.ndarray
Panel = tuple[ArrayLike, ArrayLike, ArrayLike | None]


def _to_numpy(values: ArrayLike) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)


@dataclasses.dataclass(frozen=True)
class EmbeddingMaps:
    """Result of :func:`plot_embedding_maps`: the PNG path, and per panel the rows drawn (indices
    into that panel's ``X``) and their 2-D coordinates; ``available`` the rows of the drawn
    coarse classes in each panel (before subsampling), ``coarse_classes`` the coarse labels
    drawn and ``caption`` the figure's caption."""

    path: Path
    rows: dict[str, np.ndarray]
    coordinates: dict[str, np.ndarray]
    available: dict[str, int] = dataclasses.field(default_factory=dict)
    coarse_classes: tuple[int, ...] = ()
    caption: str = ""


def tsne_embedding(
    features: ArrayLike, *, seed: int = 0, pca_dims: int = 50, perplexity: float = 30.0
) -> np.ndarray:
    """2-D t-SNE coordinates ``(N, 2)`` of L2-normalised ``features`` after PCA to ``pca_dims``.

    Deterministic: the same inputs give the same coordinates (PCA initialisation; ``seed`` goes to
    every step that draws random numbers). The perplexity is lowered to
    ``(N − 1) / 3`` for small ``N`` (t-SNE needs ``perplexity < N``). ``ValueError`` below 4 rows.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    array = _to_numpy(features).astype(np.float64)
    if array.ndim != 2 or array.shape[0] < 4:
        raise ValueError(f"t-SNE needs a 2-D array with at least 4 rows, got shape {array.shape}")
    array = array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)
    with single_threaded_native_pools():
        components = min(pca_dims, array.shape[0], array.shape[1])
        if components < array.shape[1]:
            array = PCA(n_components=components, random_state=seed).fit_transform(array)
        tsne = TSNE(
            n_components=2,
            perplexity=min(perplexity, (array.shape[0] - 1) / 3),
            init="pca",
            learning_rate="auto",
            random_state=seed,
        )
        return tsne.fit_transform(array).astype(np.float64)


def select_map_rows(
    fine_labels: ArrayLike,
    coarse_labels: ArrayLike | None,
    coarse_classes: Sequence[int] | None,
    *,
    max_points: int | None,
    seed: int,
) -> np.ndarray:
    """Sorted indices of the rows in ``coarse_classes`` (all rows without coarse labels), at most
    ``max_points`` of them drawn uniformly with ``seed``."""
    fine = _to_numpy(fine_labels).astype(np.int64)
    if coarse_labels is None:
        rows = np.arange(fine.shape[0])
    else:
        coarse = _to_numpy(coarse_labels).astype(np.int64)
        wanted = np.asarray(sorted(set(coarse_classes or [])), dtype=np.int64)
        rows = np.flatnonzero(np.isin(coarse, wanted))
    if max_points is not None and rows.size > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_points, replace=False))
    return rows


def _default_coarse_classes(fine: np.ndarray, coarse: np.ndarray) -> list[int]:
    mapping = check_fine_to_coarse(fine, coarse)
    present = sorted(set(mapping.values()))
    if len(present) <= _DEFAULT_COARSE_LIMIT:
        return present
    fine_counts = {c: sum(1 for v in mapping.values() if v == c) for c in present}
    several = [c for c in present if fine_counts[c] >= 2] or present
    return several[:_DEFAULT_COARSE_PICK]


def fine_class_colours(fine_to_coarse: Mapping[int, int]) -> dict[int, tuple[float, ...]]:
    """RGBA colour of each fine label: a hue family per coarse class, a shade per fine class.

    With a single coarse class there is no grouping to show, so the fine classes get distinct
    hues instead (tab10/tab20, or evenly spaced hues beyond 20 classes).
    """
    from matplotlib import colormaps

    coarse_order = sorted(set(fine_to_coarse.values()))
    colours: dict[int, tuple[float, ...]] = {}
    if len(coarse_order) == 1:
        members = sorted(fine_to_coarse)
        if len(members) <= 20:
            palette = colormaps["tab10" if len(members) <= 10 else "tab20"]
            picks = [palette(i) for i in range(len(members))]
        else:
            picks = [colormaps["hsv"](i / len(members)) for i in range(len(members))]
        return {f: tuple(float(v) for v in c) for f, c in zip(members, picks, strict=True)}
    for position, coarse_label in enumerate(coarse_order):
        family = colormaps[_HUE_FAMILIES[position % len(_HUE_FAMILIES)]]
        members = sorted(f for f, c in fine_to_coarse.items() if c == coarse_label)
        # Light ends of the sequential maps are nearly white: keep to the darker 60 %.
        shades = np.linspace(0.4, 0.95, len(members)) if len(members) > 1 else [0.7]
        for fine_label, shade in zip(members, shades, strict=True):
            colours[fine_label] = tuple(float(v) for v in family(float(shade)))
    return colours


def fine_class_markers(fine_to_coarse: Mapping[int, int]) -> dict[int, str]:
    """Matplotlib marker of each fine label: its position among its coarse class's fine labels
    picks a shape, so neighbouring shades of one hue also differ in shape. With a single coarse
    class the hues are distinct already, and every class is a circle up to 10 classes."""
    coarse_order = sorted(set(fine_to_coarse.values()))
    markers: dict[int, str] = {}
    if len(coarse_order) == 1:
        members = sorted(fine_to_coarse)
        # tab10 covers 10 classes by hue alone; beyond, hues repeat or crowd: shapes tell apart.
        return {
            f: "o" if len(members) <= 10 else _MARKERS[i // 10 % len(_MARKERS)]
            for i, f in enumerate(members)
        }
    for coarse_label in coarse_order:
        members = sorted(f for f, c in fine_to_coarse.items() if c == coarse_label)
        for position, fine_label in enumerate(members):
            markers[fine_label] = _MARKERS[position % len(_MARKERS)]
    return markers


def _name(names: Sequence[str] | None, label: int, prefix: str) -> str:
    return names[label] if names is not None and label < len(names) else f"{prefix} {label}"


def plot_embedding_maps(
    panels: Mapping[str, Panel],
    *,
    coarse_classes: Sequence[int] | None = None,
    fine_names: Sequence[str] | None = None,
    coarse_names: Sequence[str] | None = None,
    path: str | Path,
    seed: int = 0,
    max_points: int | None = DEFAULT_MAX_POINTS,
    perplexity: float = DEFAULT_PERPLEXITY,
    title: str | None = None,
) -> EmbeddingMaps:
    """Draw one t-SNE map per panel, side by side, and save them as one PNG.

    Args:
        panels: panel title (method or checkpoint name) → ``(X (N, D), fine_labels (N,),
            coarse_labels (N,) or None)``. Panels may have different ``N``; with the same labels
            they draw the same rows (same seed), which makes them comparable.
        coarse_classes: coarse labels to draw; ``None`` picks all when there are at most 6,
            otherwise the first 4 that hold several fine classes.
        fine_names, coarse_names: names of the labels (legend); default ``"class i"``/``"group i"``.
        path: destination PNG (parent folders are created).
        seed: seeds the subsample and the t-SNE.
        max_points: rows drawn per panel at most (``None``: all — slow for large sets).
        perplexity: t-SNE perplexity (lowered for small panels).
        title: optional figure title.

    Returns:
        :class:`EmbeddingMaps` with the PNG path and each panel's rows and coordinates.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if not panels:
        raise ValueError("plot_embedding_maps needs at least one panel")
    prepared: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
    for panel_name, (features, fine_labels, panel_coarse) in panels.items():
        array = _to_numpy(features)
        fine = _to_numpy(fine_labels).astype(np.int64)
        coarse = None if panel_coarse is None else _to_numpy(panel_coarse).astype(np.int64)
        if array.ndim != 2 or fine.shape != (array.shape[0],):
            raise ValueError(
                f"panel {panel_name!r}: X must be (N, D) and fine_labels (N,), got {array.shape} "
                f"and {fine.shape}"
            )
        if coarse is not None and coarse.shape != fine.shape:
            raise ValueError(
                f"panel {panel_name!r}: coarse_labels must be (N,) like fine_labels, got "
                f"{coarse.shape}"
            )
        prepared[panel_name] = (array, fine, coarse)

    fine_to_coarse: dict[int, int] = {}
    for _, fine, coarse in prepared.values():
        mapping = (
            check_fine_to_coarse(fine, coarse)
            if coarse is not None
            else dict.fromkeys(np.unique(fine).tolist(), 0)
        )
        fine_to_coarse.update(mapping)
    if coarse_classes is None:
        first_fine, first_coarse = next(iter(prepared.values()))[1:]
        coarse_classes = (
            [0] if first_coarse is None else _default_coarse_classes(first_fine, first_coarse)
        )
    known_coarse = set(fine_to_coarse.values())
    unknown = [c for c in coarse_classes if c not in known_coarse]
    if unknown:
        raise ValueError(
            f"coarse classes {unknown} do not occur in the labels; present: {sorted(known_coarse)}"
        )
    fine_to_coarse = {f: c for f, c in fine_to_coarse.items() if c in set(coarse_classes)}
    colours = fine_class_colours(fine_to_coarse)
    shapes = fine_class_markers(fine_to_coarse)

    columns = min(len(prepared), 3)
    rows_of_panels = -(-len(prepared) // columns)
    figure = Figure(
        figsize=(_PANEL_INCHES * columns + 2.6, _PANEL_INCHES * rows_of_panels + 0.4),
        dpi=_DPI,
        layout="constrained",
    )
    axes_grid = figure.subplots(rows_of_panels, columns, squeeze=False)
    if max_points is not None and max_points < 4:
        raise ValueError(f"max_points must be at least 4 (t-SNE needs 4 rows), got {max_points}")
    drawn_rows: dict[str, np.ndarray] = {}
    coordinates: dict[str, np.ndarray] = {}
    available: dict[str, int] = {}
    for position, (panel_name, (array, fine, coarse)) in enumerate(prepared.items()):
        axes = axes_grid[position // columns][position % columns]
        rows = select_map_rows(fine, coarse, coarse_classes, max_points=max_points, seed=seed)
        available[panel_name] = int(
            select_map_rows(fine, coarse, coarse_classes, max_points=None, seed=seed).size
        )
        if rows.size < 4:
            raise ValueError(
                f"panel {panel_name!r}: only {rows.size} rows in coarse classes "
                f"{list(coarse_classes)}; need at least 4 for a map"
            )
        points = tsne_embedding(array[rows], seed=seed, perplexity=perplexity)
        drawn_rows[panel_name], coordinates[panel_name] = rows, points
        marker_size = float(np.clip(4000.0 / rows.size, 3.0, 24.0))
        drawn_fine = fine[rows]
        for fine_label in sorted(set(drawn_fine.tolist())):
            mine = drawn_fine == fine_label
            axes.scatter(
                points[mine, 0],
                points[mine, 1],
                color=colours[fine_label],
                marker=shapes[fine_label],
                s=marker_size,
                linewidths=0,
                alpha=0.85,
            )
        axes.set_title(panel_name, fontsize=12)
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_xlabel("t-SNE 1", fontsize=9)
        axes.set_ylabel("t-SNE 2", fontsize=9)
        axes.set_aspect("equal", adjustable="datalim")
    for position in range(len(prepared), rows_of_panels * columns):
        axes_grid[position // columns][position % columns].set_axis_off()

    handles: list[Any] = []
    labels: list[str] = []
    header_positions: list[int] = []
    for coarse_label in coarse_classes:
        header_positions.append(len(labels))
        handles.append(Line2D([], [], linestyle="none"))
        labels.append(_name(coarse_names, coarse_label, "group"))
        for fine_label in sorted(f for f, c in fine_to_coarse.items() if c == coarse_label):
            handles.append(
                Line2D(
                    [],
                    [],
                    marker=shapes[fine_label],
                    linestyle="none",
                    color=colours[fine_label],
                    ms=8,
                )
            )
            labels.append("  " + _name(fine_names, fine_label, "class"))
    # Centred on the right: at the top it met the end of a long caption line.
    legend = figure.legend(
        handles, labels, loc="outside right center", frameon=False, fontsize=10, handletextpad=0.3
    )
    for index, text in enumerate(legend.get_texts()):
        if index in header_positions:
            text.set_fontweight("bold")
    caption = _map_caption(
        drawn_rows,
        available,
        seed=seed,
        perplexity=perplexity,
        coarse=[_name(coarse_names, c, "group") for c in coarse_classes],
    )
    # The caption goes with the figure: a PNG copied into a report still says what it shows.
    figure.suptitle(f"{title}\n{caption}" if title else caption, fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=_DPI)
    return EmbeddingMaps(
        path=path,
        rows=drawn_rows,
        coordinates=coordinates,
        available=available,
        coarse_classes=tuple(int(c) for c in coarse_classes),
        caption=caption,
    )


def _span(values: Sequence[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}–{high}"


def _map_caption(
    rows: Mapping[str, np.ndarray],
    available: Mapping[str, int],
    *,
    seed: int,
    perplexity: float,
    coarse: Sequence[str],
) -> str:
    """``t-SNE (perplexity 30), 300 of 1000 points per panel, seed 0, coarse classes: a, b``."""
    drawn = [int(r.size) for r in rows.values()]
    # The perplexity really used: tsne_embedding lowers it for a small panel.
    used = [min(perplexity, (n - 1) / 3) for n in drawn]
    low, high = f"{min(used):.3g}", f"{max(used):.3g}"
    shown_perplexity = (
        f"{perplexity:g}"
        if min(used) == perplexity
        else f"{low if low == high else f'{low}–{high}'}, lowered from {perplexity:g} for the "
        "panel size"
    )
    return (
        f"t-SNE (perplexity {shown_perplexity}), {_span(drawn)} of {_span(list(available.values()))} "
        f"points per panel, seed {seed}, coarse classes: {', '.join(coarse)}"
    )


def plot_metric_bars(
    table: Sequence[Mapping[str, Any]],
    metric: str | None,
    path: str | Path,
    *,
    group_by: str = "dataset",
    scale: float = 1.0,
    ylabel: str | None = None,
    title: str | None = None,
    colors: Mapping[str, str] | None = None,
    caption: str | None = None,
) -> Path:
    """Grouped bar chart: a group of bars per ``row[group_by]``, a bar per method, std error bars.

    ``table`` holds rows like those of ``report.json``'s ``"cells"``:
    ``{"method": str, "dataset": str, "metric": str, "mean": float, "std": float | None}``. Only
    rows whose ``"metric"`` equals ``metric`` are drawn (all rows when ``metric`` is ``None``, e.g.
    one dataset's protocols with ``group_by="protocol"``); values are multiplied by ``scale`` (100
    for percentages). ``colors`` maps methods to matplotlib colours, so that several charts of
    one report show a method in one colour (default: by position in this chart). A row without
    ``"std"`` (one seed) gets no error bar. ``caption`` is written under the axes (e.g. what the
    error bars are). ``ValueError`` when nothing is left to draw.
    """
    figure = metric_bars_figure(
        table,
        metric,
        group_by=group_by,
        scale=scale,
        ylabel=ylabel,
        title=title,
        colors=colors,
        caption=caption,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=_DPI)
    return path


def metric_bars_figure(
    table: Sequence[Mapping[str, Any]],
    metric: str | None,
    *,
    group_by: str = "dataset",
    scale: float = 1.0,
    ylabel: str | None = None,
    title: str | None = None,
    colors: Mapping[str, str] | None = None,
    caption: str | None = None,
) -> Figure:
    """The figure :func:`plot_metric_bars` saves (same arguments, no path)."""
    from matplotlib.figure import Figure

    selected = [
        row
        for row in table
        if (metric is None or row.get("metric") == metric) and row.get("mean") is not None
    ]
    if not selected:
        available = sorted({str(row.get("metric")) for row in table})
        raise ValueError(f"no rows for metric {metric!r} in the table; metrics: {available}")
    missing_key = [row for row in selected if group_by not in row or "method" not in row]
    if missing_key:
        raise ValueError(f"table rows need 'method' and {group_by!r} keys, got {missing_key[0]}")
    groups = list(dict.fromkeys(str(row[group_by]) for row in selected))
    methods = list(dict.fromkeys(str(row["method"]) for row in selected))
    values = {(str(r["method"]), str(r[group_by])): r for r in selected}

    width = 0.8 / len(methods)
    figure = Figure(
        figsize=(max(5.0, 2.6 + len(groups) * (0.4 + 0.3 * len(methods))), 4.2),
        dpi=_DPI,
        layout="constrained",
    )
    axes = figure.subplots()
    for position, method in enumerate(methods):
        xs, heights, errors = [], [], []
        for group_index, group in enumerate(groups):
            row = values.get((method, group))
            if row is None:
                continue
            xs.append(group_index - 0.4 + width * (position + 0.5))
            heights.append(float(row["mean"]) * scale)
            std = row.get("std")
            errors.append(float("nan") if std is None else float(std) * scale)
        axes.bar(
            xs,
            heights,
            width=width * 0.92,
            label=method,
            color=(colors or {}).get(method, f"C{position % 10}"),
        )
        spread = [(x, h, e) for x, h, e in zip(xs, heights, errors, strict=True) if e == e]
        if spread:  # one seed has no spread to show: no zero-length bar with caps
            x, h, e = zip(*spread, strict=True)
            axes.errorbar(x, h, yerr=e, fmt="none", ecolor="black", capsize=3, elinewidth=1)
    axes.set_xticks(range(len(groups)))
    axes.set_xticklabels(
        groups, rotation=20 if len(groups) > 3 else 0, ha="right" if len(groups) > 3 else "center"
    )
    axes.set_ylabel(ylabel or (metric or "value"))
    if title or metric:
        axes.set_title(title or metric)
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    figure.legend(loc="outside right upper", fontsize=9, frameon=False)
    if caption:  # what the whiskers are, inside the figure (it travels without REPORT.md)
        figure.supxlabel(caption, fontsize=8, wrap=True)
    return figure
