"""Tests for look.analysis.analyze: metrics and maps of several feature sets written to a folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from look.analysis.analyze import analyze_feature_sets, resolve_coarse_classes
from look.analysis.features import FeatureSet
from tests.analysis.synthetic import (
    COARSE_NAMES,
    FINE_NAMES,
    collapsed_fine_features,
    separated_fine_features,
)


def feature_set(name: str, separated: bool, dataset: str = "toy") -> FeatureSet:
    features, fine, coarse = (separated_fine_features if separated else collapsed_fine_features)(20)
    return FeatureSet(
        name=name,
        features=torch.from_numpy(features),
        labels=torch.from_numpy(fine),
        coarse_labels=torch.from_numpy(coarse),
        fine_names=tuple(FINE_NAMES),
        coarse_names=tuple(COARSE_NAMES),
        model={"method": name, "seed": 0},
        dataset=dataset,
    )


def test_resolve_coarse_classes() -> None:
    assert resolve_coarse_classes(None, COARSE_NAMES) is None
    assert resolve_coarse_classes(["bottoms", "0", 2, "tops"], COARSE_NAMES) == [1, 0, 2]
    with pytest.raises(ValueError, match="coarse classes: \\['tops'"):
        resolve_coarse_classes(["shoes"], COARSE_NAMES)
    with pytest.raises(ValueError, match="index < 3"):
        resolve_coarse_classes(["3"], COARSE_NAMES)


def test_analysis_without_maps_writes_json_and_markdown(tmp_path: Path) -> None:
    sets = [feature_set("look", True), feature_set("ce", False), feature_set("look", True)]
    outputs = analyze_feature_sets(sets, tmp_path, maps=False, sources=["a", "b", "c"])
    content = json.loads(outputs.multimodality_json.read_text(encoding="utf-8"))
    names = [entry["name"] for entry in content["feature_sets"]]
    assert names == ["look", "ce", "look (2)"]  # panel/row names made unique
    assert content["figures"] == [] and outputs.figures == ()
    look, ce = content["feature_sets"][:2]
    assert look["summary"]["knn_purity"] == pytest.approx(1.0)
    assert ce["summary"]["knn_purity"] < 0.6
    assert look["source"] == "a" and look["model"] == {"method": "look", "seed": 0}
    assert look["num_rows"] == 120 and look["dim"] == 16
    assert content["settings"]["k"] == 10
    markdown = outputs.markdown.read_text(encoding="utf-8")
    assert "| look | toy | 100.0 (" in markdown
    assert "| ce | bags | 20 | 1 | — (—) |" in markdown
    with pytest.raises(ValueError, match="at least one feature set"):
        analyze_feature_sets([], tmp_path)


def test_one_map_per_dataset(tmp_path: Path) -> None:
    sets = [feature_set("look", True, "first"), feature_set("ce", False, "second")]
    outputs = analyze_feature_sets(
        sets, tmp_path, max_points=40, coarse_classes=["tops"], max_clusters=3
    )
    assert [f.name for f in outputs.figures] == ["maps_first.png", "maps_second.png"]
    assert all(f.stat().st_size > 5_000 for f in outputs.figures)
    content = json.loads(outputs.multimodality_json.read_text(encoding="utf-8"))
    assert content["figures"] == ["maps_first.png", "maps_second.png"]
    assert "![maps_first](maps_first.png)" in outputs.markdown.read_text(encoding="utf-8")
