"""Paired comparison with a baseline (``look report --baseline``): differences seed by seed and a
Student-t interval, checked against hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from look.analysis.compare import (
    BETTER,
    NO_INTERVAL,
    TIE,
    WORSE,
    PairedComparison,
    UnpairedSeedsWarning,
    compare_with_baseline,
)
from look.analysis.report import Cell, write_report
from tests.analysis.test_report import write_results

# Student's t quantiles t(0.975, df) from a printed table, not from the code under test.
T_975 = {1: 12.706, 2: 4.303}


def _cell(method: str, values: list[float], seeds: list[int | None], dataset: str = "d") -> Cell:
    return Cell("transfer", method, dataset, "fine", "linear/top1", tuple(values), tuple(seeds))


@pytest.mark.parametrize(
    ("mine", "expected_verdict"),
    [([11.0, 12.0, 13.0], TIE), ([12.0, 13.0, 14.0], BETTER), ([8.0, 7.0, 6.0], WORSE)],
)
def test_interval_and_verdict_match_a_hand_computation(
    mine: list[float], expected_verdict: str
) -> None:
    baseline = _cell("ce", [10.0, 10.0, 10.0], [0, 1, 2])
    (comparison,) = compare_with_baseline([baseline, _cell("look", mine, [0, 1, 2])], ["ce"])
    differences = [m - 10.0 for m in mine]
    mean = sum(differences) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 2)
    half = T_975[2] * sd / math.sqrt(3)
    low, high = comparison.interval  # type: ignore[misc]
    assert comparison.mean == pytest.approx(mean)
    assert (low, high) == pytest.approx((mean - half, mean + half), abs=1e-3)
    assert comparison.verdict == expected_verdict


@pytest.mark.parametrize(
    ("seeds", "difference", "expected_verdict"),
    [(3, 1.0, TIE), (5, -2.0, TIE), (6, 1.0, BETTER), (6, -1.0, WORSE), (8, 0.0, TIE)],
)
def test_a_difference_equal_on_every_seed_takes_the_sign_test(
    seeds: int, difference: float, expected_verdict: str
) -> None:
    """All seeds on one side: probability 2 · 0.5^n with no real difference (0.0625 for 5
    seeds, 0.03125 for 6), where the collapsed t interval would call any of them certain."""
    baseline = _cell("ce", [10.0] * seeds, list(range(seeds)))
    mine = _cell("look", [10.0 + difference] * seeds, list(range(seeds)))
    (comparison,) = compare_with_baseline([baseline, mine], ["ce"])
    assert comparison.same_on_every_seed and comparison.verdict == expected_verdict
    assert comparison.difference_text() == f"{difference:+.2f} (the same on all {seeds} seeds)"
    row = comparison.as_row()
    assert row["ci95_low"] is None and row["same_on_every_seed"] is True


def test_only_shared_seeds_are_paired() -> None:
    baseline = _cell("ce", [10.0, 20.0, 30.0], [0, 1, 2])
    # Seed 5 has no partner and a run without a seed cannot be paired.
    method = _cell("look", [12.0, 99.0, 31.0, 50.0], [2, 5, 0, None])
    with pytest.warns(
        UnpairedSeedsWarning,
        match=r"seeds \[0, 2, 5\], its baseline 'ce' \[0, 1, 2\]: compared on seeds \[0, 2\] only",
    ):
        (comparison,) = compare_with_baseline([baseline, method], ["ce"])
    assert comparison.seeds == (0, 2) and comparison.differences == (21.0, -18.0)
    low, high = comparison.interval  # type: ignore[misc]
    sd = math.sqrt((21.0 - 1.5) ** 2 + (-18.0 - 1.5) ** 2)  # n - 1 = 1
    assert (high - low) / 2 == pytest.approx(T_975[1] * sd / math.sqrt(2), rel=1e-4)
    with pytest.warns(UnpairedSeedsWarning, match=r"compared on seeds \[1\] only"):
        (single,) = compare_with_baseline([baseline, _cell("look", [12.0], [1])], ["ce"])
    assert single.interval is None and single.verdict == NO_INTERVAL
    with pytest.warns(UnpairedSeedsWarning, match="no paired comparison is possible"):
        assert compare_with_baseline([baseline, _cell("look", [12.0], [None])], ["ce"]) == []
    with pytest.warns(UnpairedSeedsWarning, match=r"'look' on .* has seeds \[7\], .*no paired"):
        assert compare_with_baseline([baseline, _cell("look", [12.0], [7])], ["ce"]) == []


def test_each_dataset_takes_the_first_baseline_it_has() -> None:
    cells = [
        _cell("ce (coarse)", [1.0, 2.0], [0, 1], "a"),
        _cell("ce (fine)", [5.0, 5.0], [0, 1], "a"),
        _cell("look (coarse)", [2.0, 3.0], [0, 1], "a"),
        _cell("ce (fine)", [1.0, 1.0], [0, 1], "b"),
        _cell("look (fine)", [2.0, 2.0], [0, 1], "b"),
    ]
    comparisons = compare_with_baseline(cells, ["ce (coarse)", "ce (fine)"])
    pairs = {(c.dataset, c.method): c.baseline for c in comparisons}
    assert pairs == {
        ("a", "ce (fine)"): "ce (coarse)",
        ("a", "look (coarse)"): "ce (coarse)",
        ("b", "look (fine)"): "ce (fine)",
    }
    with pytest.raises(ValueError, match=r"names no row.*'look \(coarse\)'"):
        compare_with_baseline(cells, ["supcon"])


def test_a_baseline_without_the_backbone_names_the_one_row_of_that_method() -> None:
    # Row labels carry the backbone ("ce [resnet18] (coarse)"); the README's "ce (coarse)"
    # finds it when the report holds one such row, and no row when it holds several.
    ce, look = (
        _cell("ce [resnet18] (coarse)", [1.0], [0]),
        _cell("look [resnet18] (coarse)", [2.0], [0]),
    )
    (comparison,) = compare_with_baseline([ce, look], ["ce (coarse)"])
    assert comparison.baseline == "ce [resnet18] (coarse)" and comparison.differences == (1.0,)
    other = _cell("ce [resnet50] (coarse)", [3.0], [0])
    with pytest.raises(ValueError, match="names no row"):
        compare_with_baseline([ce, other, look], ["ce (coarse)"])
    (exact,) = compare_with_baseline([ce, other, look], ["ce [resnet50] (coarse)"])[-1:]
    assert exact.baseline == "ce [resnet50] (coarse)"


def test_report_writes_the_comparison(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for method, linear, knn in (("look", [0.70, 0.74, 0.72], 0.50), ("ce", [0.60, 0.62], 0.55)):
        for seed, top1 in enumerate(linear):
            protocols = {"linear": {"top1": top1}, "knn": {"k20": {"top1": knn}}}
            write_results(runs / f"{method}-{seed}", method=method, seed=seed, protocols=protocols)
    with pytest.warns(UnpairedSeedsWarning, match=r"compared on seeds \[0, 1\] only"):
        outputs = write_report([runs], tmp_path / "report", plots=False, baseline=["ce (coarse)"])
    markdown = outputs.markdown.read_text()
    section = markdown.split("## Paired differences with the baseline", 1)[1]
    assert "baseline: ce (coarse)" in section
    # linear: look 70, 74 vs ce 60, 62 on seeds 0, 1 -> differences 10 and 12.
    half = T_975[1] * math.sqrt(2.0) / math.sqrt(2)
    row = next(line for line in section.splitlines() if line.startswith("| look (coarse)"))
    assert f"+11.00 [{11 - half:+.2f}, {11 + half:+.2f}] no clear difference (2 seeds)" in row
    # kNN k=20: 50 vs 55 on both seeds: a constant difference, whose t interval would have
    # width zero; 2 seeds on one side is no evidence (sign test).
    assert "-5.00 (the same on all 2 seeds), no clear difference |" in row
    with pytest.warns(UnpairedSeedsWarning, match="no paired comparison is possible"):
        outputs = write_report(
            [runs / "look-2", runs / "ce-0"], tmp_path / "one", plots=False,
            baseline=["ce (coarse)"],
        )  # fmt: skip
    assert "## Paired differences" not in outputs.markdown.read_text()  # seeds 2 and 0: no pair
    outputs = write_report(
        [runs / "look-0", runs / "ce-0"], tmp_path / "one", plots=False, baseline=["ce (coarse)"]
    )
    assert "| look (coarse) | +10.00 (1 seed) | -5.00 (1 seed) |" in outputs.markdown.read_text()
    with pytest.warns(UnpairedSeedsWarning):
        outputs = write_report([runs], tmp_path / "report", plots=False, baseline=["ce (coarse)"])
    rows = json.loads(outputs.json.read_text())["comparisons"]
    linear = next(r for r in rows if r["metric"] == "linear/top1")
    assert linear["seeds"] == [0, 1] and linear["mean_difference"] == pytest.approx(11.0)
    assert linear["verdict"] == TIE


def test_report_compares_the_multimodality_measures_too(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    # separability: look 0.80, 0.81 vs ce 0.78, 0.78 -> +2.0 and +3.0 points (purity unchanged).
    for method, separability in (("look", [0.80, 0.81]), ("ce", [0.78, 0.78])):
        for seed, value in enumerate(separability):
            write_results(
                runs / f"{method}-{seed}", method=method, seed=seed,
                protocols={"linear": {"top1": 0.5}},
                multimodality={
                    "summary": {
                        "separability": value,
                        "knn_purity": 0.7,
                        # ARI: +0.100 and +0.110, an interval clear of zero even at 2 seeds.
                        "ari": (0.2 + 0.01 * seed) if method == "look" else 0.1,
                    }
                },
            )  # fmt: skip
    outputs = write_report([runs], tmp_path / "report", plots=False, baseline=["ce (coarse)"])
    markdown = outputs.markdown.read_text()
    section = markdown.split("## Paired differences in multi-modality", 1)[1]
    half = T_975[1] * math.sqrt(0.5) / math.sqrt(2)  # differences 2 and 3: sd √0.5
    row = next(line for line in section.splitlines() if line.startswith("| look (coarse)"))
    assert f"+2.5 [{2.5 - half:+.1f}, {2.5 + half:+.1f}] no clear difference (2 seeds)" in row
    assert "+0.0 (the same on all 2 seeds), no clear difference" in row  # purity: no difference
    ari_half = T_975[1] * math.sqrt(0.00005) / math.sqrt(2)  # differences 0.10, 0.11
    ari = f"+0.105 [{0.105 - ari_half:+.3f}, {0.105 + ari_half:+.3f}] **higher** (2 seeds)"
    assert ari in row  # ARI, raw, 3 digits
    rows = json.loads(outputs.json.read_text())["comparisons"]
    assert {row["table"] for row in rows} == {"transfer", "multimodality"}
    separability = next(r for r in rows if r["metric"] == "separability")
    assert separability["mean_difference"] == pytest.approx(0.025)


def test_a_repeated_seed_is_one_pair_on_either_side() -> None:
    """Two runs of one seed are averaged into that seed's value: n counts distinct seeds, and
    neither side's repeated value is dropped or counted as an extra independent pair."""
    baseline = _cell("ce", [80.0, 79.0, 81.0], [0, 0, 1])  # seed 0: mean 79.5
    method = _cell("look", [81.0, 82.0, 82.5], [0, 0, 1])  # seed 0: mean 81.5
    (comparison,) = compare_with_baseline([baseline, method], ["ce"])
    assert comparison.n == 2 and comparison.seeds == (0, 1)
    assert comparison.differences == pytest.approx((81.5 - 79.5, 82.5 - 81.0))
    mean = (2.0 + 1.5) / 2
    sd = math.sqrt((2.0 - mean) ** 2 + (1.5 - mean) ** 2)  # n - 1 = 1
    low, high = comparison.interval  # type: ignore[misc]
    assert (low, high) == pytest.approx(
        (mean - T_975[1] * sd / math.sqrt(2), mean + T_975[1] * sd / math.sqrt(2)), abs=1e-3
    )
    # The audit's case: seed 0 twice on the method side made 3 "pairs" and a narrow interval
    # that called +1.0, +1.0, +1.5 better; as 2 seeds (+1.0, +1.5) it is no clear difference.
    inflated = _cell("look", [81.0, 81.0, 82.5], [0, 0, 1])
    (comparison,) = compare_with_baseline([_cell("ce", [80.0, 81.0], [0, 1]), inflated], ["ce"])
    assert comparison.n == 2 and comparison.differences == (1.0, 1.5)
    assert comparison.verdict == TIE


def test_a_difference_the_same_on_every_seed_up_to_rounding_is_judged_by_the_sign_test() -> None:
    # One test image more of 1,000 on each of 3 seeds: 100·c/n rounds the differences apart by
    # ~1e-14, which made a point interval and a "better" the exact sign test does not give.
    differences = (100 * 501 / 1000 - 100 * 500 / 1000, 100 * 601 / 1000 - 100 * 600 / 1000,
                   100 * 901 / 1000 - 100 * 900 / 1000)  # fmt: skip
    assert len(set(differences)) > 1
    comparison = PairedComparison("d", "linear", "look", "ce", (0, 1, 2), differences)
    assert comparison.same_on_every_seed
    assert comparison.verdict == TIE  # 2 · 0.5³ = 0.25: no clear difference
    assert "(the same on all 3 seeds)" in comparison.difference_text()


def test_unpaired_seeds_are_named_per_metric_and_in_the_report(tmp_path: Path) -> None:
    # LOOK's seed 2 lacks kNN only: linear is paired on 3 seeds, kNN on 2.
    runs = tmp_path / "runs"
    for method in ("look", "ce"):
        for seed in range(3):
            protocols: dict[str, Any] = {"linear": {"top1": 0.6 + 0.01 * seed}}
            if not (method == "look" and seed == 2):
                protocols["knn"] = {"k20": {"top1": 0.5}}
            write_results(runs / f"{method}-{seed}", method=method, seed=seed, protocols=protocols)
    with pytest.warns(UnpairedSeedsWarning) as caught:
        outputs = write_report([runs], tmp_path / "report", plots=False, baseline=["ce (coarse)"])
    (message,) = [str(w.message) for w in caught if w.category is UnpairedSeedsWarning]
    assert "(knn/k20/top1) has seeds [0, 1]" in message and "linear" not in message
    markdown = outputs.markdown.read_text()
    assert "Seeds that could not be paired" in markdown and "knn/k20/top1" in markdown
