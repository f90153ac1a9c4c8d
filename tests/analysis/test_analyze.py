"""Tests for look.analysis.analyze: metrics and maps of several feature sets written to a folder."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

from look.analysis.analyze import MapsFailedError, analyze_feature_sets, resolve_coarse_classes
from look.analysis.features import WHOLE_SET_GROUP, FeatureSet, NoCoarseGroupingWarning
from look.analysis.multimodality import SmallSampleWarning
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
    assert "| look | toy | per coarse class | 100.0 (" in markdown
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


def test_a_set_without_coarse_labels_is_named_whole_set_and_warned_about(tmp_path: Path) -> None:
    # Without a grouping (digits), the "intra-class" measures cover the whole dataset: say so.
    whole = dataclasses.replace(feature_set("digits model", True), coarse_labels=None)
    with pytest.warns(NoCoarseGroupingWarning, match="whole set as one group"):
        outputs = analyze_feature_sets([whole, feature_set("look", True)], tmp_path, maps=False)
    content = json.loads(outputs.multimodality_json.read_text(encoding="utf-8"))
    first, second = content["feature_sets"]
    assert first["scope"] == "whole-set" and list(first["per_coarse"]) == [WHOLE_SET_GROUP]
    assert second["scope"] == "intra-coarse"
    markdown = outputs.markdown.read_text(encoding="utf-8")
    assert "**No coarse grouping** for `digits model`" in markdown
    assert "| digits model | toy | whole set |" in markdown
    assert f"| digits model | {WHOLE_SET_GROUP} |" in markdown
    assert "all classes" not in markdown


def test_settings_are_recorded_and_stated(tmp_path: Path) -> None:
    sets = [feature_set("look", True), feature_set("ce", False)]
    outputs = analyze_feature_sets(
        sets, tmp_path, max_points=50, coarse_classes=["tops"], max_per_coarse=30, k=5
    )
    content = json.loads(outputs.multimodality_json.read_text(encoding="utf-8"))
    settings = content["settings"]
    assert settings["k"] == 5 and settings["max_per_coarse"] == 30 and settings["folds"] == 3
    assert settings["silhouette_threshold"] == 0.25
    maps = settings["maps"]
    assert maps["max_points"] == 50 and maps["perplexity"] == 30.0 and maps["seed"] == 0
    (figure,) = maps["figures"]
    assert figure["file"] == "maps.png" and figure["coarse_classes"] == ["tops"]
    # "tops" holds 3 fine classes of 20 rows: 60 rows, 50 drawn.
    assert figure["points_per_panel"] == {"look": 50, "ce": 50}
    assert figure["rows_available_per_panel"] == {"look": 60, "ce": 60}
    # t-SNE lowers the perplexity to (n - 1) / 3 for 50 points: the caption says the one used.
    assert figure["caption"] == (
        "t-SNE (perplexity 16.3, lowered from 30 for the panel size), 50 of 60 points per "
        "panel, seed 0, coarse classes: tops"
    )
    markdown = outputs.markdown.read_text(encoding="utf-8")
    assert "Settings: kNN k = 5, at most 30 rows per coarse class" in markdown
    assert "silhouette ≥ 0.25" in markdown and "3-fold" in markdown
    assert f"*{figure['caption']}.*" in markdown
    # Per coarse class: rows measured of the class's rows.
    assert "| look | tops | 30 of 60 | 3 |" in markdown


def test_ari_at_fine_count_and_ari_chance_are_shown(tmp_path: Path) -> None:
    outputs = analyze_feature_sets([feature_set("look", True)], tmp_path, maps=False)
    markdown = outputs.markdown.read_text(encoding="utf-8")
    assert "ARI at fine count | ARI chosen |" in markdown
    assert "chance level of either ARI is 0" in markdown
    summary = json.loads(outputs.multimodality_json.read_text(encoding="utf-8"))["feature_sets"][0][
        "summary"
    ]
    assert f"{summary['ari_at_fine_count']:.3f} (0) | {summary['ari']:.3f} (0) |" in markdown


def test_nan_features_name_the_feature_set_and_its_file(tmp_path: Path) -> None:
    broken = feature_set("look", True)
    broken.features[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"feature set 'look' from runs/look.features.pt.*row"):
        analyze_feature_sets([broken], tmp_path, maps=False, sources=["runs/look.features.pt"])


def test_a_small_subsample_reports_the_data_and_warns(tmp_path: Path) -> None:
    # One row per coarse class: the data's fine classes are counted, and the sample is too small.
    with pytest.warns(SmallSampleWarning, match="holds 1 of its 3 fine classes"):
        outputs = analyze_feature_sets(
            [feature_set("look", True)], tmp_path, maps=False, max_per_coarse=1
        )
    tops = outputs.metrics["look"]["per_coarse"]["tops"]
    assert tops["num_fine_classes"] == 3 and tops["num_rows"] == 60
    assert tops["num_samples"] == 1 and tops["num_fine_classes_sampled"] == 1
    assert tops["warnings"]
    markdown = outputs.markdown.read_text(encoding="utf-8")
    assert "| look | tops [1] | 1 of 60 | 3 |" in markdown
    # k capped: 6 rows per coarse class with k = 10 measures every other row.
    with pytest.warns(SmallSampleWarning, match="k = 5 instead of 10"):
        outputs = analyze_feature_sets(
            [feature_set("look", True)], tmp_path, maps=False, max_per_coarse=6
        )
    assert outputs.metrics["look"]["per_coarse"]["tops"]["k_effective"] == 5


def test_fine_classes_of_at_most_k_rows_state_the_purity_they_allow(tmp_path: Path) -> None:
    # 20 rows per fine class and k = 25: a row has at most 19 neighbours of its class.
    with pytest.warns(SmallSampleWarning, match=r"cannot exceed 76\.0 %"):
        outputs = analyze_feature_sets([feature_set("look", True)], tmp_path, maps=False, k=25)
    tops = outputs.metrics["look"]["per_coarse"]["tops"]
    assert tops["k_effective"] == 25 and tops["knn_purity"] <= 19 / 25 + 1e-12
    # With k below the class size there is no such ceiling, and no note.
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallSampleWarning)
        analyze_feature_sets([feature_set("look", True)], tmp_path / "k10", maps=False, k=10)


def test_bad_map_arguments_fail_before_any_metric(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import look.analysis.analyze as analyze_module

    def no_metrics(*args: object, **kwargs: object) -> None:
        raise AssertionError("metrics computed before the arguments were checked")

    monkeypatch.setattr(analyze_module, "multimodality_metrics", no_metrics)
    with pytest.raises(ValueError, match="coarse class 'shoes'"):
        analyze_feature_sets([feature_set("look", True)], tmp_path, coarse_classes=["shoes"])
    with pytest.raises(ValueError, match="max_points \\(--max-points\\) must be at least 4"):
        analyze_feature_sets([feature_set("look", True)], tmp_path, max_points=3)


def test_a_failing_map_keeps_the_metrics_and_names_no_maps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import look.analysis.maps as maps_module

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("t-SNE exploded")

    monkeypatch.setattr(maps_module, "plot_embedding_maps", broken)
    with pytest.raises(MapsFailedError, match=r"t-SNE exploded.*--no-maps"):
        analyze_feature_sets([feature_set("look", True)], tmp_path)
    content = json.loads((tmp_path / "multimodality.json").read_text(encoding="utf-8"))
    assert content["feature_sets"][0]["summary"]["knn_purity"] == pytest.approx(1.0)
    assert (tmp_path / "ANALYSIS.md").is_file()


def test_maps_of_an_earlier_run_are_removed(tmp_path: Path) -> None:
    sets = [feature_set("look", True, "first"), feature_set("ce", False, "second")]
    analyze_feature_sets(sets, tmp_path, max_points=40, coarse_classes=["tops"], max_clusters=3)
    assert (tmp_path / "maps_first.png").is_file()
    (tmp_path / "notes.png").write_bytes(b"mine")  # not this command's: kept
    outputs = analyze_feature_sets(
        sets[:1], tmp_path, max_points=40, coarse_classes=["tops"], max_clusters=3
    )
    assert [f.name for f in outputs.figures] == ["maps.png"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["maps.png", "notes.png"]


def test_a_rerun_into_a_relative_folder_replaces_its_maps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The folder's glob and multimodality.json's list once named the same map twice (relative
    # and absolute): the re-run removed it twice and failed, as `look demo` run again did.
    monkeypatch.chdir(tmp_path)
    relative = Path("analysis")
    sets = [feature_set("look", True)]
    for _ in range(2):
        outputs = analyze_feature_sets(
            sets, relative, max_points=40, coarse_classes=["tops"], max_clusters=3
        )
        assert [f.name for f in outputs.figures] == ["maps.png"]
        assert (tmp_path / "analysis" / "maps.png").is_file()


def test_a_write_that_fails_midway_leaves_the_previous_analysis_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `look report` reads multimodality.json back: a full disk must not leave half a file.
    sets = [feature_set("look", True), feature_set("ce", False)]
    outputs = analyze_feature_sets(sets, tmp_path, maps=False)
    before = outputs.multimodality_json.read_text(encoding="utf-8")

    def half_then_full_disk(self: Path, text: str, *args: object, **kwargs: object) -> int:
        with open(self, "w", encoding="utf-8") as handle:
            handle.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        analyze_feature_sets(sets[::-1], tmp_path, maps=False)
    monkeypatch.undo()
    assert outputs.multimodality_json.read_text(encoding="utf-8") == before
    assert not list(tmp_path.glob(".multimodality.json.*"))  # no temporary file left behind
