"""Tests for look.analysis.maps: seeded t-SNE, the multi-panel map PNG and bar charts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from look.analysis.maps import (
    fine_class_colours,
    fine_class_markers,
    metric_bars_figure,
    plot_embedding_maps,
    plot_metric_bars,
    select_map_rows,
    tsne_embedding,
)
from tests.analysis.synthetic import (
    COARSE_NAMES,
    FINE_NAMES,
    FINE_TO_COARSE,
    collapsed_fine_features,
    separated_fine_features,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_tsne_is_seeded_and_keeps_separated_classes_apart() -> None:
    features, fine, _ = separated_fine_features(20)
    first = tsne_embedding(features, seed=5)
    second = tsne_embedding(features, seed=5)
    assert first.shape == (features.shape[0], 2)
    np.testing.assert_array_equal(first, second)
    # Each fine class is a tight cluster in 16-D: its 2-D points are closer to their own centroid
    # than to any other class's.
    centroids = np.stack([first[fine == c].mean(axis=0) for c in range(6)])
    distances = np.linalg.norm(first[:, None, :] - centroids[None], axis=2)
    assert np.all(distances.argmin(axis=1) == fine)


def test_tsne_rejects_too_few_rows() -> None:
    with pytest.raises(ValueError, match="at least 4 rows"):
        tsne_embedding(np.zeros((3, 5)))


def test_select_map_rows_keeps_chosen_coarse_classes_and_caps_seeded() -> None:
    fine = np.repeat(np.arange(6), 10)
    coarse = FINE_TO_COARSE[fine]
    rows = select_map_rows(fine, coarse, [0, 2], max_points=None, seed=0)
    assert set(coarse[rows].tolist()) == {0, 2} and rows.size == 40
    capped = select_map_rows(fine, coarse, [0, 2], max_points=15, seed=1)
    assert capped.size == 15 and np.all(np.diff(capped) > 0)
    np.testing.assert_array_equal(
        capped, select_map_rows(fine, coarse, [0, 2], max_points=15, seed=1)
    )
    assert select_map_rows(fine, None, None, max_points=None, seed=0).size == 60


def test_colours_share_a_hue_family_per_coarse_class_and_differ_per_fine_class() -> None:
    colours = fine_class_colours(dict(enumerate(FINE_TO_COARSE.tolist())))
    assert len(set(colours.values())) == len(FINE_TO_COARSE)
    # Blues for coarse 0: blue channel dominates; oranges for coarse 1: red channel dominates.
    for fine_label in (0, 1, 2):
        red, _, blue, _ = colours[fine_label]
        assert blue > red
    for fine_label in (3, 4):
        red, _, blue, _ = colours[fine_label]
        assert red > blue
    # One coarse class: distinct hues, not ten shades of blue.
    single = fine_class_colours(dict.fromkeys(range(10), 0))
    assert len({colour[:3] for colour in single.values()}) == 10
    assert not all(colour[2] > colour[0] for colour in single.values())


def test_embedding_maps_png_one_panel_per_method(tmp_path: Path) -> None:
    good, fine, coarse = separated_fine_features(25)
    collapsed, _, _ = collapsed_fine_features(25)
    result = plot_embedding_maps(
        {"LOOK": (good, fine, coarse), "CE": (collapsed, fine, coarse)},
        coarse_classes=[0, 1],
        fine_names=FINE_NAMES,
        coarse_names=COARSE_NAMES,
        path=tmp_path / "sub" / "maps.png",
        seed=0,
        max_points=100,
    )
    data = result.path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 20_000  # two panels of points and a legend, not an empty canvas
    assert set(result.coordinates) == {"LOOK", "CE"}
    # Same labels and seed: both panels draw the same rows, from the chosen coarse classes only.
    np.testing.assert_array_equal(result.rows["LOOK"], result.rows["CE"])
    assert result.rows["LOOK"].size == 100
    assert set(coarse[result.rows["LOOK"]].tolist()) == {0, 1}
    assert result.coordinates["LOOK"].shape == (100, 2)


def test_embedding_maps_reject_unknown_coarse_class_and_empty_panels(tmp_path: Path) -> None:
    features, fine, coarse = separated_fine_features(5)
    with pytest.raises(ValueError, match="do not occur"):
        plot_embedding_maps(
            {"a": (features, fine, coarse)}, coarse_classes=[7], path=tmp_path / "m.png"
        )
    with pytest.raises(ValueError, match="at least one panel"):
        plot_embedding_maps({}, path=tmp_path / "m.png")


def test_metric_bars(tmp_path: Path) -> None:
    table = [
        {"method": m, "dataset": d, "metric": "linear/top1", "mean": v, "std": 0.01}
        for m, d, v in [("look", "a", 0.8), ("ce", "a", 0.7), ("look", "b", 0.6)]
    ]
    table.append({"method": "look", "dataset": "a", "metric": "knn/k20/top1", "mean": 0.5})
    path = plot_metric_bars(table, "linear/top1", tmp_path / "bars.png", scale=100.0)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match="no rows for metric"):
        plot_metric_bars(table, "fewshot/5way1shot/mean", tmp_path / "none.png")


def test_metric_bars_colour_methods_alike_and_skip_error_bars_of_one_seed() -> None:
    from matplotlib.colors import to_rgba
    from matplotlib.container import BarContainer, ErrorbarContainer

    table = [
        {"method": "look", "dataset": "a", "metric": "m", "mean": 0.8, "std": 0.02},
        {"method": "look", "dataset": "b", "metric": "m", "mean": 0.6, "std": 0.01},
        {"method": "ce", "dataset": "a", "metric": "m", "mean": 0.7, "std": None},  # one seed
    ]
    figure = metric_bars_figure(table, "m", colors={"ce": "C0", "look": "C3"})
    axes = figure.axes[0]
    bars = {c.get_label(): c for c in axes.containers if isinstance(c, BarContainer)}
    # "look" comes first in this chart, yet keeps the colour the report gave it.
    assert all(patch.get_facecolor() == to_rgba("C3") for patch in bars["look"].patches)
    assert bars["ce"].patches[0].get_facecolor() == to_rgba("C0")
    error_bars = [c for c in axes.containers if isinstance(c, ErrorbarContainer)]
    assert len(error_bars) == 1, "the single-seed bar has no (zero-length) error bar"
    segments = error_bars[0].lines[2][0].get_segments()
    assert sorted(round(abs(s[1][1] - s[0][1]), 6) for s in segments) == [0.02, 0.04]


def test_fine_classes_of_one_coarse_class_differ_in_shape_too() -> None:
    # Shades of one hue are hard to tell apart as small dots (Coat vs Shirt): shapes differ too.
    mapping = {int(f): int(c) for f, c in enumerate(FINE_TO_COARSE)}
    markers = fine_class_markers(mapping)
    assert markers == fine_class_markers(mapping)  # deterministic
    for coarse in set(mapping.values()):
        members = [markers[f] for f, c in mapping.items() if c == coarse]
        assert len(set(members)) == len(members)


def test_maps_draw_shapes_in_the_legend_label_axes_and_caption(tmp_path: Path) -> None:
    features, fine, coarse = separated_fine_features(20)
    result = plot_embedding_maps(
        {"look": (features, fine, coarse)},
        coarse_classes=[0, 1],
        coarse_names=COARSE_NAMES,
        path=tmp_path / "maps.png",
        max_points=60,
    )
    assert result.caption.startswith("t-SNE (perplexity ")
    assert "60 of 100 points per panel, seed 0, coarse classes: tops, bottoms" in result.caption
    assert result.available == {"look": 100}
