"""Tests for look.analysis.commands: `look analyze` and `look report` through their own parser."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from look.analysis.commands import register, run_analyze, run_report
from look.analysis.features import FeatureSet, save_feature_set
from tests.analysis.synthetic import (
    COARSE_NAMES,
    FINE_NAMES,
    FINE_TO_COARSE,
    collapsed_fine_features,
    separated_fine_features,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="look")
    register(parser.add_subparsers(dest="command"))
    return parser


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--output" in text and "example:" in text
    assert ("feature files" in text) if command == "analyze" else ("results.json" in text)


def test_analyze_needs_exactly_one_source(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["analyze", "--output", "x"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["analyze", "--features", "a", "--results", "b", "--output", "x"])


def write_feature_files(folder: Path) -> None:
    grouping = {n: COARSE_NAMES[c] for n, c in zip(FINE_NAMES, FINE_TO_COARSE, strict=True)}
    (folder / "grouping.json").write_text(json.dumps({"name": "toy", "fine_to_coarse": grouping}))
    for method, make in (("look", separated_fine_features), ("ce", collapsed_fine_features)):
        features, fine, _ = make(20, seed=1)
        save_feature_set(
            FeatureSet(
                name=f"{method} (coarse)",
                features=torch.from_numpy(features),
                labels=torch.from_numpy(fine),
                fine_names=tuple(FINE_NAMES),  # no coarse labels: --grouping supplies them
                model={"method": method, "seed": 0, "pretrain_labels": "coarse"},
                dataset="toy",
            ),
            folder / "features" / f"{method}.features.pt",
        )


def test_analyze_then_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_feature_files(tmp_path)
    parser = build_parser()
    args = parser.parse_args(
        [
            "analyze",
            "--results",
            str(tmp_path / "features"),
            "--grouping",
            str(tmp_path / "grouping.json"),
            "--output",
            str(tmp_path / "analysis"),
            "--coarse-classes",
            "tops",
            "bottoms",
            "--max-points",
            "60",
            "--max-clusters",
            "4",
        ]
    )
    assert run_analyze(args) == 0
    analysis = tmp_path / "analysis"
    assert (analysis / "maps.png").stat().st_size > 10_000
    assert "ANALYSIS.md" in capsys.readouterr().out
    content = json.loads((analysis / "multimodality.json").read_text(encoding="utf-8"))
    by_name = {entry["name"]: entry for entry in content["feature_sets"]}
    assert set(by_name["ce (coarse)"]["per_coarse"]) == set(COARSE_NAMES)
    assert by_name["look (coarse)"]["summary"]["separability"] == pytest.approx(1.0)

    results = tmp_path / "runs" / "look-0" / "results.json"
    results.parent.mkdir(parents=True)
    results.write_text(
        json.dumps(
            {
                "model": {"name": "r", "method": "look", "seed": 0, "pretrain_labels": "coarse"},
                "dataset": "toy",
                "labels": "fine",
                "protocols": {"linear": {"top1": 0.8}},
            }
        )
    )
    args = parser.parse_args(
        [
            "report",
            str(tmp_path / "runs"),
            str(analysis),
            "--output",
            str(tmp_path / "report"),
            "--title",
            "Toy report",
        ]
    )
    assert run_report(args) == 0
    markdown = (tmp_path / "report" / "REPORT.md").read_text(encoding="utf-8")
    assert markdown.startswith("# Toy report")
    assert "| look (coarse) | 80.00 (1 seed) |" in markdown
    assert "| look (coarse) | **100.0 (1 seed)** |" in markdown  # multi-modality row
    assert "(figures/map_0_maps.png)" in markdown
    assert (tmp_path / "report" / "report.csv").is_file()


def test_analyze_errors_are_clear(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["analyze", "--features", str(tmp_path / "none.pt"), "--output", str(tmp_path / "o")]
    )
    with pytest.raises(FileNotFoundError, match="neither a feature file"):
        run_analyze(args)
    write_feature_files(tmp_path)
    args = parser.parse_args(
        [
            "analyze",
            "--results",
            str(tmp_path / "features"),
            "--output",
            str(tmp_path / "o"),
            "--max-points",
            "-1",
        ]
    )
    with pytest.raises(ValueError, match="--max-points must be >= 0"):
        run_analyze(args)
    # Checked before any file is read: the features named here do not exist.
    for flag, value, message in (
        ("--k", "0", "--k must be at least 1"),
        ("--max-clusters", "1", "--max-clusters must be at least 2"),
    ):
        args = parser.parse_args(
            ["analyze", "--features", str(tmp_path / "none.pt"), "--output",
             str(tmp_path / "o"), flag, value]
        )  # fmt: skip
        with pytest.raises(ValueError, match=message):
            run_analyze(args)


def test_report_baseline_flag(tmp_path: Path) -> None:
    from tests.analysis.test_report import write_results

    for method in ("look", "ce"):
        for seed in (0, 1):
            write_results(
                tmp_path / "runs" / f"{method}{seed}", method=method, seed=seed,
                protocols={"linear": {"top1": 0.8 + 0.01 * seed + (method == "look") * 0.02}},
            )  # fmt: skip
    parser = build_parser()
    common = ["report", str(tmp_path / "runs"), "--output", str(tmp_path / "report")]
    args = parser.parse_args([*common, "--baseline", "supcon", "--baseline", "ce (coarse)"])
    assert run_report(args) == 0
    markdown = (tmp_path / "report" / "REPORT.md").read_text(encoding="utf-8")
    # +2 points on both seeds: two seeds on one side are no evidence (sign test), not "better".
    assert "| look (coarse) | +2.00 (the same on all 2 seeds), no clear difference |" in markdown
    with pytest.raises(ValueError, match="names no row"):
        run_report(parser.parse_args([*common, "--baseline", "supcon"]))


def test_report_names_colliding_files_without_python_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.analysis.test_report import write_results

    paths = [
        write_results(tmp_path / "runs" / name, method="look", seed=0, protocols={"linear": 0.8})
        for name in ("first", "again")
    ]
    args = build_parser().parse_args(
        ["report", str(tmp_path / "runs"), "--output", str(tmp_path / "report")]
    )
    assert run_report(args) == 0
    errors = capsys.readouterr().err
    assert errors.startswith("look: warning: 2 inputs give 'look (coarse)' on fashion_mnist seed 0")
    assert all(str(path.resolve()) in errors for path in paths)
    assert "warnings.warn" not in errors and "report.py" not in errors


def test_report_says_which_inputs_are_incomplete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.analysis.test_report import write_results

    path = write_results(
        tmp_path / "runs" / "cut",
        method="look",
        seed=0,
        protocols={"linear": 0.8},
        complete=False,
        pending_protocols=["finetune"],
    )
    args = build_parser().parse_args(
        ["report", str(tmp_path / "runs"), "--output", str(tmp_path / "report")]
    )
    assert run_report(args) == 0
    errors = capsys.readouterr().err
    assert errors.startswith(f"look: warning: results file {path.resolve()} is incomplete")
    assert "finetune did not run" in errors and "warnings.warn" not in errors


def test_report_names_mixed_settings_without_python_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.analysis.test_report import write_results

    for seed, grouping in ((0, "/a/groups.json"), (1, "/b/groups.json")):
        write_results(
            tmp_path / "runs" / str(seed),
            method="look",
            seed=seed,
            protocols={"linear": 0.8},
            labels=grouping,
        )
    args = build_parser().parse_args(
        ["report", str(tmp_path / "runs"), "--output", str(tmp_path / "report")]
    )
    assert run_report(args) == 0
    errors = capsys.readouterr().err
    assert errors.startswith(
        "look: warning: 'look (coarse)' on fashion_mnist (groups) averages runs with different "
        "settings"
    )
    assert "warnings.warn" not in errors and "report.py" not in errors


def test_analyze_blames_the_max_points_flag(tmp_path: Path) -> None:
    write_feature_files(tmp_path)
    args = build_parser().parse_args(
        [
            "analyze",
            "--results",
            str(tmp_path / "features"),
            "--output",
            str(tmp_path / "o"),
            "--grouping",
            str(tmp_path / "grouping.json"),
            "--max-points",
            "3",
        ]
    )
    with pytest.raises(ValueError, match="--max-points must be at least 4"):
        run_analyze(args)
    assert not (tmp_path / "o").exists()  # refused before any work


def test_analyze_finds_a_moved_cache_with_cache_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from look.data import FASHION_MNIST_CLASSES
    from tests.analysis.synthetic import evaluation_results

    cache = tmp_path / "moved" / "abc.pt"
    cache.parent.mkdir()
    fine = torch.arange(10).repeat(20)  # enough rows per coarse class for k = 10
    torch.save({"features": torch.randn(200, 8), "fine_labels": fine, "meta": {}}, cache)
    run = tmp_path / "run"
    run.mkdir()
    content = evaluation_results(
        class_names=list(FASHION_MNIST_CLASSES), cache_path="/gone/cache/abc.pt"
    )
    (run / "results.json").write_text(json.dumps(content), encoding="utf-8")
    argv = ["analyze", "--results", str(run), "--output", str(tmp_path / "o"), "--no-maps"]
    with pytest.raises(FileNotFoundError, match=r"/gone/cache/abc\.pt.*--cache-dir"):
        run_analyze(build_parser().parse_args(argv))
    assert run_analyze(build_parser().parse_args([*argv, "--cache-dir", str(cache.parent)])) == 0
    written = json.loads((tmp_path / "o" / "multimodality.json").read_text(encoding="utf-8"))
    entry = written["feature_sets"][0]
    assert entry["source"] == str((run / "results.json").resolve())
    assert entry["feature_file"] == str(cache.resolve())
    assert "multimodality.json" in capsys.readouterr().out
