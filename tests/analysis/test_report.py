"""Tests for look.analysis.report: reading results.json, aggregation over seeds, REPORT.md/json/csv."""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import warnings
from pathlib import Path
from typing import Any

import pytest

from look.analysis.report import (
    MISSING,
    MixedSettingsWarning,
    RepeatedSeedWarning,
    find_report_inputs,
    write_report,
)
from tests.analysis.synthetic import evaluation_results


def write_results(
    folder: Path,
    *,
    method: str,
    seed: int | None,
    protocols: dict[str, Any],
    dataset: str = "fashion_mnist",
    labels: str = "fine",
    **extra: Any,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    content = {
        "model": {
            "name": f"{method}-{seed}",
            "method": method,
            "seed": seed,
            "pretrain_labels": "coarse",
            "checkpoint": "x.pt",
        },
        "dataset": dataset,
        "labels": labels,
        "protocols": protocols,
        "units": "accuracies as fractions",  # (files without units: see test_results.py)
        **extra,
    }
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """look: 3 seeds with linear, kNN and fine-tune; ce: 2 seeds, no fine-tune."""
    root = tmp_path / "runs"
    for seed, top1 in enumerate([0.70, 0.74, 0.72]):
        write_results(
            root / f"look-{seed}",
            method="look",
            seed=seed,
            protocols={
                "linear": {"top1": top1, "mean_per_class": top1 - 0.1},
                "knn": {"k20": {"top1": 0.5}, "k200": {"top1": 0.4 + 0.01 * seed}},
                "finetune": {"top1": 0.9},
                "fewshot": {"5way1shot": {"mean": 0.3, "ci95": 0.02}},
            },
        )
    for seed, top1 in enumerate([0.60, 0.62]):
        write_results(
            root / f"ce-{seed}",
            method="ce",
            seed=seed,
            protocols={
                "linear": {"top1": top1},
                "knn": {"k20": {"top1": 0.55}, "k200": {"top1": "n/a"}},
                "fewshot": {"5way1shot": {"mean": 0.35, "ci95": 0.02}},
            },
            notes="extra keys are ignored",
        )
    return root


def markdown_rows(markdown: str, heading: str) -> dict[str, list[str]]:
    """Rows of the first table after ``heading``: method → cells."""
    section = markdown.split(heading, 1)[1]
    rows: dict[str, list[str]] = {}
    header_seen = False
    for line in section.splitlines():
        if not line.startswith("|"):
            if header_seen and rows:
                break
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if not header_seen:
            header_seen = True
            rows["__header__"] = cells[1:]
        elif not cells[0].startswith(":--"):
            rows[cells[0]] = cells[1:]
    return rows


def test_inputs_are_found_or_reported_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a results file nor a directory"):
        find_report_inputs([tmp_path / "missing"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no results\.json"):
        find_report_inputs([empty])
    results = write_results(tmp_path / "a", method="look", seed=0, protocols={})
    (tmp_path / "a" / "multimodality.json").write_text("{}")
    assert find_report_inputs([tmp_path, results]) == (
        [results.resolve()],
        [(tmp_path / "a" / "multimodality.json").resolve()],
    )


def test_report_aggregates_over_seeds_exactly(runs: Path, tmp_path: Path) -> None:
    # The same file given twice (directly and through its folder) counts once.
    outputs = write_report(
        [runs, runs / "look-0" / "results.json"], tmp_path / "report", title="Test report"
    )
    markdown = outputs.markdown.read_text(encoding="utf-8")
    assert markdown.startswith("# Test report")
    rows = markdown_rows(markdown, "## Transfer accuracy")
    assert rows["__header__"] == [
        "fashion_mnist<br>linear",
        "fashion_mnist<br>kNN k20",
        "fashion_mnist<br>kNN k200",
        "fashion_mnist<br>few-shot 5way1shot",
        "fashion_mnist<br>fine-tune",
    ]
    look, ce = rows["look (coarse)"], rows["ce (coarse)"]
    # look linear: 0.70, 0.74, 0.72 → mean 72 %, sample std 2 %; best of the column.
    assert look[0] == "**72.00 ± 2.00 (3 seeds)**"
    # ce linear: 0.60, 0.62 → mean 61 %, std sqrt(2 * 0.01²) = 1.414 %.
    assert ce[0] == "61.00 ± 1.41 (2 seeds)"
    assert ce[1] == "**55.00 ± 0.00 (2 seeds)**" and look[1] == "50.00 ± 0.00 (3 seeds)"
    # ce's k200 was not a number and it has no fine-tune: shown as missing.
    assert ce[2] == MISSING and ce[4] == MISSING
    assert look[2] == "41.00 ± 1.00 (3 seeds)"  # alone in its column: nothing to be best of
    assert look[3] == "30.00 ± 0.00 (3 seeds)" and ce[3] == "**35.00 ± 0.00 (2 seeds)**"

    report = json.loads(outputs.json.read_text(encoding="utf-8"))
    cells = {(c["method"], c["metric"]): c for c in report["cells"]}
    linear = cells[("look (coarse)", "linear/top1")]
    # Fractions without "units" are read as fractions and reported in percent.
    assert linear["mean"] == pytest.approx(72.0, abs=1e-12)
    assert linear["std"] == pytest.approx(2.0, abs=1e-12)
    assert linear["n"] == 3 and linear["seeds"] == [0, 1, 2] and linear["best"] is True
    # Secondary metrics are in report.json but not in the Markdown table.
    assert cells[("look (coarse)", "linear/mean_per_class_accuracy")]["headline"] is False
    assert cells[("look (coarse)", "fewshot/5way1shot/ci95")]["mean"] == pytest.approx(2.0)
    assert cells[("ce (coarse)", "linear/top1")]["std"] == pytest.approx(math.sqrt(2))

    with outputs.csv.open(encoding="utf-8", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert len(csv_rows) == len(report["cells"])
    for row, cell in zip(csv_rows, report["cells"], strict=True):
        assert (row["method"], row["metric"], row["dataset"]) == (
            cell["method"],
            cell["metric"],
            cell["dataset"],
        )
        assert float(row["mean"]) == cell["mean"]  # exactly the same numbers
        assert (float(row["std"]) if row["std"] else None) == cell["std"]
        assert int(row["n"]) == cell["n"]
        assert [float(v) for v in row["values"].split(";")] == cell["values"]

    # Embedded plots are relative links to files that exist.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert links and all(not Path(link).is_absolute() for link in links)
    for link in links:
        assert (outputs.markdown.parent / link).stat().st_size > 5_000


def test_report_multimodality_table_and_maps(tmp_path: Path) -> None:
    root = tmp_path / "in"
    for method, purities in (("look", [0.9, 0.8]), ("ce", [0.4, 0.5])):
        for seed, purity in enumerate(purities):
            write_results(
                root / f"{method}-{seed}",
                method=method,
                seed=seed,
                protocols={"linear": {"top1": 0.5}},
                multimodality={
                    "summary": {
                        "knn_purity": purity,
                        "knn_purity_chance": 0.3,
                        "separability": 0.7,
                        "cluster_count": 2.0,
                        "ari": 0.25,
                    },
                    "per_coarse": {"a": {"knn_purity": purity}},
                },
            )
    analysis = tmp_path / "analysis"
    analysis.mkdir()
    (analysis / "maps.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 100)
    (analysis / "multimodality.json").write_text(
        json.dumps(
            {
                "feature_sets": [
                    {
                        "name": "supcon features",
                        "model": None,
                        "dataset": "fashion_mnist",
                        "summary": {"knn_purity": 0.6, "cluster_count": 1.0, "ari": None},
                    }
                ],
                "figures": ["maps.png", "missing.png"],
            }
        )
    )
    outputs = write_report([root, analysis], tmp_path / "report", plots=False)
    markdown = outputs.markdown.read_text(encoding="utf-8")
    rows = markdown_rows(markdown, "## Intra-class multi-modality")
    assert rows["__header__"][0] == "fine kNN purity (%)"
    assert rows["look (coarse)"][0] == "**85.0 ± 7.1 (2 seeds)**"
    assert rows["ce (coarse)"][0] == "45.0 ± 7.1 (2 seeds)"
    assert rows["supcon features"][0] == "60.0 (1 seed)"
    # Cluster counts are not ranked, ARI is not shown as %.
    assert rows["look (coarse)"][2] == "2.00 ± 0.00 (2 seeds)"
    assert rows["look (coarse)"][3] == "**0.250 ± 0.000 (2 seeds)**"
    assert rows["supcon features"][3] == MISSING
    assert "Chance level" in markdown
    assert "figures/map_0_maps.png" in markdown
    assert (outputs.markdown.parent / "figures" / "map_0_maps.png").is_file()
    assert "missing.png" not in markdown
    report = json.loads(outputs.json.read_text(encoding="utf-8"))
    purity = [
        c
        for c in report["cells"]
        if c["table"] == "multimodality"
        and c["metric"] == "knn_purity"
        and c["method"] == "look (coarse)"
    ]
    assert purity[0]["mean"] == pytest.approx(0.85) and purity[0]["n"] == 2
    # Again without the analysis: its copied map goes (another report's), a user's file stays.
    (outputs.markdown.parent / "figures" / "mine.png").write_bytes(b"x")
    outputs = write_report([root], tmp_path / "report", plots=False)
    figures = sorted(p.name for p in (outputs.markdown.parent / "figures").iterdir())
    assert figures == ["mine.png"]


def test_report_without_numbers_is_an_error(tmp_path: Path) -> None:
    write_results(tmp_path / "a", method="look", seed=0, protocols={})
    with pytest.raises(ValueError, match="hold no accuracy"):
        write_report([tmp_path], tmp_path / "out")


def test_report_of_evaluation_format_results(tmp_path: Path) -> None:
    root = tmp_path / "evals"
    for seed, top1 in enumerate([80.0, 82.0]):
        folder = root / f"look-{seed}"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(
            json.dumps(evaluation_results(seed=seed, linear_top1=top1))
        )
    folder = root / "timm"
    folder.mkdir()
    (folder / "results.json").write_text(
        json.dumps(evaluation_results(method=None, linear_top1=50.0, labels="coarse"))
    )
    outputs = write_report([root], tmp_path / "report", plots=False)
    markdown = outputs.markdown.read_text(encoding="utf-8")
    rows = markdown_rows(markdown, "## Transfer accuracy")
    assert rows["__header__"][0] == "fashion_mnist<br>linear"
    assert rows["__header__"][3] == "fashion_mnist<br>few-shot 5way1shot"
    assert rows["look [resnet18] (coarse)"][0] == "81.00 ± 1.41 (2 seeds)"  # alone: not bold
    assert rows["look [resnet18] (coarse)"][5] == "90.00 ± 0.00 (2 seeds)"
    # Evaluated on coarse labels: another column group, its own row.
    assert "fashion_mnist (coarse)<br>linear" in rows["__header__"]
    assert rows["resnet18 (coarse)"][0] == MISSING


def _write_imagefolder_evaluation(folder: Path, root: str, *, seed: int = 0) -> Path:
    content = evaluation_results(seed=seed, dataset="imagefolder")
    content["dataset"]["root"] = root
    folder.mkdir(parents=True)
    path = folder / "results.json"
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def test_report_keeps_image_folders_apart(tmp_path: Path) -> None:
    _write_imagefolder_evaluation(tmp_path / "in" / "a", "/data/pets")
    _write_imagefolder_evaluation(tmp_path / "in" / "b", "/data/flowers")
    _write_imagefolder_evaluation(tmp_path / "in" / "c", "/other/pets")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one seed per row and dataset: nothing repeats
        outputs = write_report([tmp_path / "in"], tmp_path / "report", plots=False)
    rows = markdown_rows(outputs.markdown.read_text(encoding="utf-8"), "## Transfer accuracy")
    datasets = list(dict.fromkeys(h.split("<br>")[0] for h in rows["__header__"]))
    # Two roots named "pets" are told apart by their full path.
    assert datasets == ["imagefolder:/data/pets", "imagefolder:flowers", "imagefolder:/other/pets"]
    assert all(cell.endswith("1 seed)") for cell in rows["look [resnet18] (coarse)"])


def test_repeated_seeds_name_the_colliding_files(tmp_path: Path) -> None:
    first = _write_imagefolder_evaluation(tmp_path / "in" / "a", "/data/pets")
    second = _write_imagefolder_evaluation(tmp_path / "in" / "b", "/data/pets")
    with pytest.warns(RepeatedSeedWarning) as caught:
        write_report([tmp_path / "in"], tmp_path / "report", plots=False)
    assert len(caught) == 1, "one message per row, dataset and seed, not per metric"
    message = str(caught[0].message)
    assert "'look [resnet18] (coarse)' on imagefolder:pets seed 0" in message
    assert str(first.resolve()) in message and str(second.resolve()) in message


def test_a_seed_evaluated_twice_is_one_seed_of_its_runs_mean(tmp_path: Path) -> None:
    # A checkpoint evaluated into two folders once read as "2 seeds" with a spread of 0.
    for folder, seed, top1 in (("a", 0, 0.70), ("a-again", 0, 0.74), ("b", 1, 0.60)):
        write_results(
            tmp_path / "in" / folder, method="look", seed=seed, protocols={"linear": {"top1": top1}}
        )
    with pytest.warns(RepeatedSeedWarning):
        outputs = write_report([tmp_path / "in"], tmp_path / "report", plots=False)
    cell = next(
        c for c in json.loads(outputs.json.read_text())["cells"] if c["metric"] == "linear/top1"
    )
    assert (cell["n"], cell["runs"], cell["seeds"]) == (2, 3, [0, 0, 1])
    assert cell["mean"] == pytest.approx(100 * (0.72 + 0.60) / 2)
    assert cell["std"] == pytest.approx(statistics.stdev([72.0, 60.0]))
    row = markdown_rows(outputs.markdown.read_text(encoding="utf-8"), "## Transfer accuracy")
    assert row["look (coarse)"][0] == "66.00 ± 8.49 (3 runs of 2 seeds)"


def test_a_bar_chart_says_what_its_whiskers_are_and_the_seeds_behind_them(
    runs: Path, tmp_path: Path
) -> None:
    outputs = write_report([runs], tmp_path / "report")
    markdown = outputs.markdown.read_text(encoding="utf-8")
    caption = (
        "*Bars: mean over seeds; whiskers: sample standard deviation over seeds; a bar without "
        "one has a single seed. Seeds per method: ce (coarse) 2, look (coarse) 3.*"
    )
    assert f"![fashion_mnist](figures/bars_fashion_mnist.png)\n\n{caption}" in markdown


def test_report_shows_the_k_a_knn_column_really_used(tmp_path: Path) -> None:
    for seed in (0, 1):
        content = evaluation_results(seed=seed)
        content["protocols"]["knn"]["results"][1]["k_effective"] = 54
        folder = tmp_path / "in" / f"s{seed}"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(content), encoding="utf-8")
    outputs = write_report([tmp_path / "in"], tmp_path / "report", plots=False)
    markdown = outputs.markdown.read_text(encoding="utf-8")
    row = markdown_rows(markdown, "## Transfer accuracy")["look [resnet18] (coarse)"]
    assert row[1] == "70.00 ± 0.00 (2 seeds)" and row[2] == "65.00 ± 0.00 (2 seeds, k = 54)"
    assert "only N neighbours voted" in markdown
    cells = json.loads(outputs.json.read_text(encoding="utf-8"))["cells"]
    k200 = next(c for c in cells if c["metric"] == "knn/k200/top1")
    assert k200["k_effective"] == [54]
    with outputs.csv.open(encoding="utf-8", newline="") as handle:
        by_metric = {row["metric"]: row for row in csv.DictReader(handle)}
    assert by_metric["knn/k200/top1"]["k_effective"] == "54"
    assert by_metric["knn/k20/top1"]["k_effective"] == ""


def _write_evaluation(folder: Path, content: dict[str, Any]) -> Path:
    folder.mkdir(parents=True)
    path = folder / "results.json"
    path.write_text(json.dumps(content), encoding="utf-8")
    return path.resolve()


def _with_settings(content: dict[str, Any]) -> dict[str, Any]:
    """``content`` with the evaluation image size and protocol settings `look evaluate` records."""
    content["dataset"]["image_size"] = 28
    content["protocol_settings"] = {
        "knn": {"ks": [20, 200], "temperature": 0.07},
        "fewshot": {
            "n_way": 5,
            "shots": [1, 5],
            "queries": 15,
            "episodes": 100,
            "warn_few_episodes": True,
        },
    }
    return content


def _run_pair(tmp_path: Path, change: Any) -> tuple[Path, Path]:
    """Two seeds of one row; ``change(content)`` edits the second one's results.json."""
    first = _write_evaluation(tmp_path / "in" / "a", _with_settings(evaluation_results(seed=0)))
    content = _with_settings(evaluation_results(seed=1, linear_top1=60.0))
    change(content)
    return first, _write_evaluation(tmp_path / "in" / "b", content)


def _report_warnings(tmp_path: Path) -> tuple[list[str], str, dict[str, Any]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = write_report([tmp_path / "in"], tmp_path / "report", plots=False)
    mixed = [str(w.message) for w in caught if issubclass(w.category, MixedSettingsWarning)]
    report = json.loads(outputs.json.read_text(encoding="utf-8"))
    return mixed, outputs.markdown.read_text(encoding="utf-8"), report


def test_a_row_that_mixes_settings_is_warned_about_and_marked(tmp_path: Path) -> None:
    def other_setting(content: dict[str, Any]) -> None:
        content["model"]["pretraining"]["dataset"] = "mnist"
        content["model"]["global_step"] = 5
        content["dataset"]["image_size"] = 64
        content["protocol_settings"]["knn"]["temperature"] = 0.5

    first, second = _run_pair(tmp_path, other_setting)
    mixed, markdown, report = _report_warnings(tmp_path)
    assert len(mixed) == 1, "one message per row, not per metric"
    message = mixed[0]
    assert message.startswith("'look [resnet18] (coarse)' on fashion_mnist averages runs with")
    for expected in (
        f'model.pretraining.dataset: "fashion_mnist" in {first} vs "mnist" in {second}',
        f"model.global_step: 100 in {first} vs 5 in {second}",
        f"dataset.image_size: 28 in {first} vs 64 in {second}",
        f"protocol_settings.knn.temperature: 0.07 in {first} vs 0.5 in {second}",
        str(first),
        str(second),
    ):
        assert expected in message
    # The reader of REPORT.md sees it too: a Warnings note and a mark on every mixed cell.
    assert "## Warnings" in markdown
    note = next(line for line in markdown.splitlines() if line.startswith("- **⚠1**"))
    assert "`look [resnet18] (coarse)` on fashion_mnist" in note
    assert '`model.pretraining.dataset`: `"fashion_mnist"`' in note and str(second) in note
    row = markdown_rows(markdown, "## Transfer accuracy")["look [resnet18] (coarse)"]
    assert row[0] == "70.62 ± 15.03 (2 seeds) ⚠1"  # linear: 81.25 and 60.0, sd 21.25 / √2
    assert all(cell.endswith("⚠1") for cell in row)
    linear = next(c for c in report["cells"] if c["metric"] == "linear/top1")
    assert "model.pretraining.dataset" in linear["mixed_settings"]
    assert "protocol_settings.knn.temperature" not in linear["mixed_settings"]  # kNN only
    knn = next(c for c in report["cells"] if c["metric"] == "knn/k20/top1")
    assert "protocol_settings.knn.temperature" in knn["mixed_settings"]
    assert {c["setting"] for c in report["settings_conflicts"]} >= {
        "model.pretraining.dataset",
        "protocol_settings.knn.temperature",
    }


def test_what_differs_between_seeds_by_design_is_no_setting(tmp_path: Path) -> None:
    def another_seed(content: dict[str, Any]) -> None:
        content["model"]["path"] = "/runs/y/ckpt-100.pt"
        content["seed"] = 3
        content["timings_s"] = {"linear": 12.5}
        content["created"] = "2030-01-01T00:00:00+00:00"
        content["protocols"]["fewshot"]["seed"] = 3
        # Whether a short run warned about its episodes is a message, not a setting.
        content.setdefault("protocol_settings", {}).setdefault("fewshot", {})[
            "warn_few_episodes"
        ] = False

    _run_pair(tmp_path, another_seed)
    mixed, markdown, report = _report_warnings(tmp_path)
    assert mixed == [] and "## Warnings" not in markdown and "⚠" not in markdown
    assert report["settings_conflicts"] == []


@pytest.mark.parametrize("field", ["evaluation", "pretraining"])
def test_grouping_files_of_one_name_are_told_apart(tmp_path: Path, field: str) -> None:
    """/a/groups.json and /b/groups.json share the short label but are not one setting."""

    def grouping(path: str) -> Any:
        def change(content: dict[str, Any]) -> None:
            if field == "evaluation":
                content["labels"]["evaluation"] = path
                content["labels"]["evaluation_grouping"] = "groups"
            else:
                content["model"]["pretraining"]["labels"] = path
                content["labels"]["pretraining"] = path

        return change

    first = evaluation_results(seed=0)
    grouping("/a/groups.json")(first)
    _write_evaluation(tmp_path / "in" / "a", first)
    second = evaluation_results(seed=1)
    grouping("/b/groups.json")(second)
    _write_evaluation(tmp_path / "in" / "b", second)
    mixed, markdown, _ = _report_warnings(tmp_path)
    assert len(mixed) == 1
    assert '"/a/groups.json" in' in mixed[0] and '"/b/groups.json" in' in mixed[0]
    rows = markdown_rows(markdown, "## Transfer accuracy")
    # The short label stays in the row and column names.
    if field == "pretraining":
        assert "look [resnet18] (groups)" in rows
    else:
        assert rows["__header__"][0] == "fashion_mnist (groups)<br>linear"


def test_rows_evaluated_differently_are_marked_in_their_column(tmp_path: Path) -> None:
    for method, temperature in (("look", 0.07), ("ce", 0.5)):
        for seed in (0, 1):
            content = evaluation_results(method=method, seed=seed)
            content["protocol_settings"] = {"knn": {"ks": [20, 200], "temperature": temperature}}
            _write_evaluation(tmp_path / "in" / f"{method}{seed}", content)
    mixed, markdown, _ = _report_warnings(tmp_path)
    assert len(mixed) == 1 and mixed[0].startswith("the rows of fashion_mnist were evaluated")
    assert "look [resnet18] (coarse): " in mixed[0] and "ce [resnet18] (coarse): " in mixed[0]
    rows = markdown_rows(markdown, "## Transfer accuracy")
    for method in ("look [resnet18] (coarse)", "ce [resnet18] (coarse)"):
        linear, knn20 = rows[method][0], rows[method][1]
        assert "⚠" not in linear and knn20.endswith(" ⚠1")


def test_the_compact_shape_compares_only_what_it_records(tmp_path: Path) -> None:
    for seed in (0, 1):
        write_results(
            tmp_path / "in" / f"s{seed}",
            method="look",
            seed=seed,
            protocols={"linear": {"top1": 0.7}},
            labels="/a/groups.json" if seed == 0 else "/b/groups.json",
        )
    mixed, markdown, _ = _report_warnings(tmp_path)
    assert len(mixed) == 1 and "labels: " in mixed[0] and "/b/groups.json" in mixed[0]
    assert "(groups)<br>linear" in markdown


def test_a_single_seed_fewshot_cell_shows_its_episode_interval(tmp_path: Path) -> None:
    content = evaluation_results(seed=0)
    content["protocols"]["fewshot"]["settings"][0].update(episodes=600, ci95=0.41)
    _write_evaluation(tmp_path / "in" / "one", content)
    for seed in (0, 1):
        content = evaluation_results(method="ce", seed=seed)
        content["protocols"]["fewshot"]["settings"][0].update(
            mean_accuracy=30.0 + 2.0 * seed, episodes=600
        )
        _write_evaluation(tmp_path / "in" / f"ce{seed}", content)
    outputs = write_report([tmp_path / "in"], tmp_path / "report", plots=False)
    markdown = outputs.markdown.read_text(encoding="utf-8")
    rows = markdown_rows(markdown, "## Transfer accuracy")
    header = rows["__header__"]
    one = rows["look [resnet18] (coarse)"][header.index("fashion_mnist<br>few-shot 5way1shot")]
    assert one == "**50.00 ± 0.41 (95 % CI over 600 episodes, 1 seed)**"
    # Several seeds: the ± stays the std over seeds, and says nothing about episodes.
    several = rows["ce [resnet18] (coarse)"][header.index("fashion_mnist<br>few-shot 5way1shot")]
    assert several == "31.00 ± 1.41 (2 seeds)"
    # Not a few-shot cell: a single seed has no ± at all.
    assert rows["look [resnet18] (coarse)"][0].strip("*") == "81.25 (1 seed)"
    assert "95 % confidence interval over the episodes" in markdown
    cells = json.loads(outputs.json.read_text(encoding="utf-8"))["cells"]
    fewshot = next(
        c
        for c in cells
        if c["metric"] == "fewshot/5way1shot/mean_accuracy" and c["method"].startswith("look")
    )
    assert fewshot["std"] is None and fewshot["episode_ci95"] == pytest.approx(0.41)
    assert fewshot["episodes"] == 600


def test_results_that_look_evaluate_warned_about_are_marked(tmp_path: Path) -> None:
    doubtful = evaluation_results(seed=0)
    doubtful["protocols"]["linear"].update(
        refit_converged=False, refit_stop_reason="max_iter", grid_fits_not_converged=1,
        c_at_grid_edge="largest",
    )  # fmt: skip
    _write_evaluation(tmp_path / "in" / "look0", doubtful)
    _write_evaluation(tmp_path / "in" / "look1", evaluation_results(seed=1))
    few_episodes = evaluation_results(method="ce", seed=1)
    few_episodes["protocols"]["fewshot"].update(episodes_below_spec=True, spec_min_episodes=600)
    _write_evaluation(tmp_path / "in" / "ce1", few_episodes)
    _write_evaluation(tmp_path / "in" / "ce0", evaluation_results(method="ce", seed=0))
    outputs = write_report([tmp_path / "in"], tmp_path / "report", plots=False)
    markdown = outputs.markdown.read_text(encoding="utf-8")
    rows = markdown_rows(markdown, "## Transfer accuracy")
    header = rows["__header__"]
    linear = header.index("fashion_mnist<br>linear")
    # The row averaging the doubtful fit is marked; the kNN cells of that row and CE's are not.
    assert rows["look [resnet18] (coarse)"][linear].endswith(" †")
    assert not rows["look [resnet18] (coarse)"][linear + 1].endswith("†")
    assert not rows["ce [resnet18] (coarse)"][linear].endswith("†")
    fewshot = header.index("fashion_mnist<br>few-shot 5way1shot")
    assert rows["ce [resnet18] (coarse)"][fewshot].endswith(" †")
    assert not rows["look [resnet18] (coarse)"][fewshot].endswith("†")
    note = markdown.split("## Evaluation warnings", 1)[1].split("##", 1)[0]
    assert "look0" in note and "ce1" in note and "look1" not in note and "ce0" not in note
    for problem in ("did not converge (stopped on max_iter)", "1/1 fits of the C grid",
                    "largest end of its grid", "minimum of 600"):  # fmt: skip
        assert problem in note
    cells = json.loads(outputs.json.read_text(encoding="utf-8"))["cells"]
    marked = {(c["method"], c["metric"]) for c in cells if c["problems"]}
    assert marked == {
        ("look [resnet18] (coarse)", "linear/top1"),
        ("look [resnet18] (coarse)", "linear/mean_per_class_accuracy"),
        *(("ce [resnet18] (coarse)", c["metric"]) for c in cells if "fewshot/" in c["metric"]),
    }
    # Without such a fit, no mark and no section; nor for what look evaluate was told not to
    # warn about (a smoke run's narrow grid and few episodes).
    clean = write_report([tmp_path / "in" / "ce0"], tmp_path / "clean", plots=False)
    assert "†" not in clean.markdown.read_text(encoding="utf-8")
    deliberate = evaluation_results(seed=2)
    deliberate["protocols"]["linear"].update(c_at_grid_edge="largest", grid_edge_warned=False)
    deliberate["protocols"]["fewshot"].update(episodes_below_spec=True, few_episodes_warned=False)
    _write_evaluation(tmp_path / "smoke" / "look2", deliberate)
    smoke = write_report([tmp_path / "smoke"], tmp_path / "smoke_report", plots=False)
    assert "†" not in smoke.markdown.read_text(encoding="utf-8")


def test_means_that_read_the_same_are_all_bold(tmp_path: Path) -> None:
    for method, top1 in (("look", 72.004), ("ce", 72.001), ("supcon", 71.0)):
        write_results(
            tmp_path / "in" / method,
            method=method,
            seed=0,
            protocols={"linear": {"top1": top1}},
            units="percent",
        )
    outputs = write_report([tmp_path / "in"], tmp_path / "report", plots=False)
    rows = markdown_rows(outputs.markdown.read_text(encoding="utf-8"), "## Transfer accuracy")
    assert rows["look (coarse)"][0] == "**72.00 (1 seed)**"
    assert rows["ce (coarse)"][0] == "**72.00 (1 seed)**"
    assert rows["supcon (coarse)"][0] == "71.00 (1 seed)"


def test_both_shapes_fill_one_fewshot_column(tmp_path: Path) -> None:
    """The compact "mean" and the evaluation's "mean_accuracy" are one metric: one column, not
    two with the same header, and the best is chosen over both rows."""
    _write_evaluation(tmp_path / "in" / "look", evaluation_results(seed=0))  # 5way1shot: 50 %
    write_results(
        tmp_path / "in" / "ce",
        method="ce",
        seed=0,
        protocols={"fewshot": {"5way1shot": {"mean": 0.55, "mean_per_class": 0.5}}},
    )
    outputs = write_report([tmp_path / "in"], tmp_path / "report", plots=False)
    rows = markdown_rows(outputs.markdown.read_text(encoding="utf-8"), "## Transfer accuracy")
    header = rows["__header__"]
    assert header.count("fashion_mnist<br>few-shot 5way1shot") == 1
    column = header.index("fashion_mnist<br>few-shot 5way1shot")
    assert rows["ce (coarse)"][column] == "**55.00 (1 seed)**"
    assert rows["look [resnet18] (coarse)"][column].startswith("50.00 ± 1.50 (95 % CI")


def write_multimodality(
    folder: Path,
    entries: list[dict[str, Any]],
    *,
    k: int = 10,
    max_per_coarse: int | None = 2000,
) -> Path:
    """A multimodality.json as look analyze writes it (settings shared by its feature sets)."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {
        "k": k,
        "max_per_coarse": max_per_coarse,
        "max_clusters": 6,
        "folds": 3,
        "silhouette_threshold": 0.25,
        "pca_dims": 50,
        "seed": 0,
        "maps": None,
    }
    path = folder / "multimodality.json"
    path.write_text(
        json.dumps({"schema_version": 1, "settings": settings, "feature_sets": entries}),
        encoding="utf-8",
    )
    return path


def analysed(
    method: str,
    seed: int,
    purity: float,
    *,
    chance: float = 0.3,
    dataset: str = "fashion_mnist",
    scope: str = "intra-coarse",
) -> dict[str, Any]:
    return {
        "name": f"{method} seed {seed}",
        "dataset": dataset,
        "model": {"method": method, "seed": seed, "pretrain_labels": "coarse"},
        "scope": scope,
        "grouping": "fashion_mnist_coarse" if scope == "intra-coarse" else None,
        "summary": {
            "knn_purity": purity,
            "knn_purity_chance": chance,
            "separability": 0.7,
            "separability_chance": 0.4,
            "cluster_count": 2.0,
            "ari": 0.0,
            "ari_at_fine_count": 0.2,
        },
    }


def test_multimodality_rows_of_different_analysis_settings_are_warned_about_and_marked(
    tmp_path: Path,
) -> None:
    # Seed 1 of look was analysed with k = 20, and ce with another subsample: neither the row's
    # mean nor the bold best compares like with like.
    write_multimodality(tmp_path / "a0", [analysed("look", 0, 0.9), analysed("ce", 0, 0.5)])
    write_multimodality(tmp_path / "a1", [analysed("look", 1, 0.8, chance=0.2)], k=20)
    write_multimodality(tmp_path / "a2", [analysed("ce", 1, 0.4)], max_per_coarse=300)
    with pytest.warns(MixedSettingsWarning) as caught:
        outputs = write_report([tmp_path], tmp_path / "report", plots=False)
    messages = " ".join(str(w.message) for w in caught)
    assert "multimodality.k" in messages and "multimodality.max_per_coarse" in messages
    markdown = outputs.markdown.read_text(encoding="utf-8")
    rows = markdown_rows(markdown, "## Intra-class multi-modality")
    assert "⚠" in rows["look (coarse)"][0]
    assert "⚠" in rows["ce (coarse)"][0]
    assert "## Warnings" in markdown and "`multimodality.k`" in markdown
    # Settings stated per group of rows, and chance levels per row instead of one average.
    assert "Settings (`look analyze`) differ between rows" in markdown
    assert "kNN k = 20" in markdown and "at most 300 rows per coarse class" in markdown
    chance = markdown_rows(markdown, "Chance levels of each row")
    assert chance["look (coarse)"][0].startswith("25.0 ± 7.1 (2 seeds)")
    assert chance["ce (coarse)"][0].startswith("30.0 ± 0.0 (2 seeds)")
    report = json.loads(outputs.json.read_text(encoding="utf-8"))
    assert {c["setting"] for c in report["settings_conflicts"]} == {
        "multimodality.k",
        "multimodality.max_per_coarse",
    }


def test_multimodality_rows_of_one_setting_are_not_marked(tmp_path: Path) -> None:
    write_multimodality(tmp_path / "a0", [analysed("look", 0, 0.9), analysed("ce", 0, 0.5)])
    write_multimodality(tmp_path / "a1", [analysed("look", 1, 0.8), analysed("ce", 1, 0.4)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", MixedSettingsWarning)
        outputs = write_report([tmp_path], tmp_path / "report", plots=False)
    markdown = outputs.markdown.read_text(encoding="utf-8")
    assert "⚠" not in markdown
    assert "Settings (`look analyze`): kNN k = 10, at most 2000 rows per coarse class" in markdown


def test_whole_set_rows_are_not_presented_per_coarse_class(tmp_path: Path) -> None:
    # digits ships no grouping: its numbers cover the whole set, in columns of their own.
    write_multimodality(
        tmp_path / "a",
        [
            analysed("look", 0, 0.9),
            analysed("look", 0, 0.6, dataset="digits", scope="whole-set"),
        ],
    )
    outputs = write_report([tmp_path], tmp_path / "report", plots=False)
    markdown = outputs.markdown.read_text(encoding="utf-8")
    rows = markdown_rows(markdown, "## Intra-class multi-modality")
    header = rows["__header__"]
    assert "fashion_mnist<br>clusters per coarse class" in header
    assert "digits (whole set)<br>clusters in the whole set" in header
    assert not any(h.startswith("digits") and "per coarse class" in h for h in header)
    assert "**No coarse grouping** in digits (whole set)" in markdown


def test_ari_at_fine_count_is_a_column_and_ari_chance_is_stated(tmp_path: Path) -> None:
    write_multimodality(tmp_path / "a", [analysed("look", 0, 0.9), analysed("ce", 0, 0.5)])
    outputs = write_report([tmp_path], tmp_path / "report", plots=False)
    markdown = outputs.markdown.read_text(encoding="utf-8")
    rows = markdown_rows(markdown, "## Intra-class multi-modality")
    assert rows["__header__"][4] == "ARI at fine count"
    assert rows["look (coarse)"][4].startswith("**0.200 (1 seed)")
    assert "the chance level of either ARI is 0" in markdown


def test_seeds_of_different_pretraining_recipes_are_warned_about_and_marked(
    tmp_path: Path,
) -> None:
    # A k = 5 run and a k = 50 run under one label are not two seeds of one thing; a speed-only
    # option (chunk_size) is not recorded, so it never splits a row.
    def model(seed: int, k: int) -> dict[str, Any]:
        training = {"method_options": {"k": k, "temperature": 0.1}, "optim": {"lr": 0.1}}
        pretraining = {"dataset": "fashion_mnist", "labels": "coarse", "method": "look",
                       "seed": seed, "training": training}  # fmt: skip
        return {"method": "look", "seed": seed, "pretrain_labels": "coarse",
                "pretraining": pretraining}  # fmt: skip

    protocols = {"linear": {"top1": 0.7}}
    for seed, k in ((0, 5), (1, 50)):
        write_results(tmp_path / f"r{seed}", method="look", seed=seed, protocols=protocols,
                      model=model(seed, k))  # fmt: skip
    with pytest.warns(MixedSettingsWarning) as caught:
        outputs = write_report([tmp_path], tmp_path / "report", plots=False)
    messages = " ".join(str(w.message) for w in caught)
    assert "model.pretraining.training.method_options.k" in messages
    assert "temperature" not in messages  # the options that agree are not named
    assert "⚠" in outputs.markdown.read_text(encoding="utf-8")
    write_results(tmp_path / "r1", method="look", seed=1, protocols=protocols, model=model(1, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MixedSettingsWarning)
        write_report([tmp_path], tmp_path / "report", plots=False)


def test_training_settings_leave_out_speed_only_options() -> None:
    from look.engine.export import training_settings

    config = {
        "method": {"name": "look", "k": 5, "chunk_size": 4096, "search_backend": "torch"},
        "optim": {"lr": 0.1, "grad_accum_steps": 4},
        "data": {"augment": "auto", "num_workers": 8, "root": "/data"},
        "model": {"backbone": "resnet18", "backbone_kwargs": {}, "pretrained_weights": None},
    }
    assert training_settings(config) == {
        "method_options": {"k": 5}, "optim": {"lr": 0.1}, "augment": "auto",
    }  # fmt: skip
