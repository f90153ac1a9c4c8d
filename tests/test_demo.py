from __future__ import annotations

import json
from pathlib import Path

import pytest

from look.demo import (
    METHODS_SCENARIO_1,
    SCENARIO_COARSE,
    SCENARIO_DIGITS,
    DemoPlan,
    _monitor_section,
    _verdict,
    monitor_curves,
    plan_runs,
    pretrain_config,
)
from look.engine.metrics_log import MetricsLogger
from look.methods import get_method_class


@pytest.mark.parametrize("plan", [DemoPlan.default(), DemoPlan.quick()], ids=["default", "quick"])
def test_every_demo_run_has_a_valid_config(plan: DemoPlan) -> None:
    runs = plan_runs(plan)
    names = {(r.scenario, r.name) for r in runs}
    for method in METHODS_SCENARIO_1:
        # MoCo v2 never reads the labels it is trained next to; its label says so.
        label = "mocov2 (no labels)" if method == "mocov2" else f"{method} (coarse)"
        assert (SCENARIO_COARSE, label) in names
    assert (SCENARIO_COARSE, "ce (fine, upper ref.)") in names
    assert (SCENARIO_COARSE, "random init (floor)") in names
    assert (SCENARIO_DIGITS, "look (fine)") in names
    for run in runs:
        if run.method is None:
            continue
        cfg = pretrain_config(plan, run.method, run.labels, run.seed, "cpu")
        # Same budget for every method: only the method section differs.
        assert (cfg.optim.epochs, cfg.data.subset, cfg.model.backbone) == (
            plan.epochs,
            plan.train_subset,
            plan.backbone,
        )
        # Every pre-training watches the fine labels (the report's training curves).
        assert (cfg.train.knn_monitor, cfg.train.knn_monitor_labels) == ("fashion_mnist", "fine")
        assert cfg.train.knn_monitor_images == plan.monitor_images
        options = get_method_class(run.method).parse_options(cfg.method)
        if run.method == "look":
            assert options.k_fraction == plan.look_k_fraction
            assert plan.look_k_fraction is not None or options.k == plan.look_k


def test_the_verdict_states_wins_and_losses_from_the_numbers() -> None:
    one_seed = {
        "look (coarse)": {0: {"linear": 80.0}},
        "ce (coarse)": {0: {"linear": 82.5}},
        "nca (coarse)": {0: {"linear": 79.0}},
    }
    text = _verdict(one_seed, "linear", "look (coarse)", ["ce (coarse)", "nca (coarse)"])
    assert "below ce (coarse) (80.00 vs 82.50; one seed, no interval)" in text
    assert "above nca (coarse) (80.00 vs 79.00; one seed, no interval)" in text
    # Three seeds: differences +1, +2, +3 against CE (interval 2 ± 4.303/√3 spans 0), and
    # +2, +3, +4 against NCA (excludes 0); SupCon has no shared seed and is left out.
    three_seeds = {
        "look (coarse)": {s: {"linear": 80.0 + s} for s in (0, 1, 2)},
        "ce (coarse)": {s: {"linear": 79.0} for s in (0, 1, 2)},
        "nca (coarse)": {s: {"linear": 78.0} for s in (0, 1, 2)},
        "supcon (coarse)": {7: {"linear": 1.0}},
    }
    text = _verdict(
        three_seeds, "linear", "look (coarse)", ["ce (coarse)", "nca (coarse)", "supcon (coarse)"]
    )
    assert (
        "is level with ce (coarse) (81.00 vs 79.00; difference +2.00 [-0.48, +4.48] over 3 seeds)"
        in text
    )
    assert (
        "beats nca (coarse) (81.00 vs 78.00; difference +3.00 [+0.52, +5.48] over 3 seeds)" in text
    )
    assert "supcon" not in text
    assert (
        _verdict(three_seeds, "knn20", "look (coarse)", ["ce (coarse)"])
        == "- knn20: no LOOK result."
    )


def test_monitor_curves_average_the_seeds_and_make_a_table_and_figure(tmp_path: Path) -> None:
    runs = {}
    for seed, offset in ((0, 0.0), (1, 2.0)):
        run_dir = tmp_path / f"look_s{seed}"
        with MetricsLogger(run_dir, tensorboard=False) as logger:
            for epochs, accuracy in ((0, 40.0), (1, 60.0), (2, 70.0)):
                logger.log(
                    10 * epochs,
                    {"knn_top1": accuracy + offset, "epochs_trained": epochs},
                    split="monitor",
                )
        runs.setdefault("look (coarse)", []).append(run_dir)
    runs["ce (coarse)"] = [tmp_path / "no_monitor"]  # a run from before the monitor: left out
    curves = monitor_curves(runs)
    assert curves == {"look (coarse)": [(0, 41.0), (1, 61.0), (2, 71.0)]}
    lines = _monitor_section(curves, tmp_path, DemoPlan.quick())
    assert "| look (coarse) | 41.00 | 61.00 | 71.00 |" in lines
    assert (tmp_path / "monitor.png").stat().st_size > 5_000
    assert _monitor_section({}, tmp_path, DemoPlan.quick()) == []


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~3 minutes on 2 idle cores; more when they are shared
def test_quick_demo_end_to_end(tmp_path: Path) -> None:
    from look.demo import run_demo

    report = run_demo(tmp_path, plan=DemoPlan.quick(), device="cpu")
    text = report.read_text()
    assert "Verdict" in text and "look (coarse)" in text and "**Smoke run**" in text
    assert (tmp_path / "analysis" / "maps.png").stat().st_size > 10_000
    assert "## Fine-label kNN during pre-training" in text
    assert (tmp_path / "monitor.png").stat().st_size > 5_000
    assert json.loads((tmp_path / "timings.json").read_text())["total"] > 0


def test_a_folder_of_another_plan_is_refused_and_seeds_may_be_added(tmp_path: Path) -> None:
    from dataclasses import asdict, replace

    from look.demo import check_same_plan

    quick = DemoPlan.quick()
    (tmp_path / "plan.json").write_text(json.dumps(asdict(quick)))
    check_same_plan(tmp_path, replace(quick, seeds=(0, 1, 2), num_workers=0))
    with pytest.raises(
        ValueError, match=r"another plan \(train_subset 2000 then, 10000 now; epochs 1 then, 3 now"
    ):
        check_same_plan(tmp_path, DemoPlan.default())
    # A plan written before a field existed: the field is not compared.
    older = {k: v for k, v in asdict(quick).items() if k != "smoke"}
    (tmp_path / "plan.json").write_text(json.dumps(older))
    check_same_plan(tmp_path, quick)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--train-subset", "0"], "--train-subset must be at least 1, got 0"),
        (["--seeds", "0", "0"], "--seeds must be distinct non-negative integers"),
        (
            ["--train-subset", "70000"],
            "--train-subset (images to pre-train on) is 70000: it must lie between 128 (the "
            "demo's batch of 128 images) and 60000 (its training images)",
        ),
        # Fewer images than one batch once passed this check and failed in pre-training, with
        # advice (lower the batch size) that look demo offers no option for.
        (["--train-subset", "50"], "is 50: it must lie between 128 (the demo's batch"),
    ],
)
def test_bad_demo_options_fail_before_any_work(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    options: list[str],
    message: str,
) -> None:
    import look.data
    from look.cli import main

    # Fashion-MNIST's training split as the check sees it (the test needs no dataset files).
    monkeypatch.setattr(look.data, "load_source", lambda spec, split: [0] * 60000)

    assert main(["demo", "--quick", "--output", str(tmp_path / "demo"), *options]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_only_a_finished_evaluation_is_skipped_on_a_rerun(tmp_path: Path) -> None:
    from look.demo import _finished_evaluation

    path = tmp_path / "results.json"
    assert not _finished_evaluation(path)
    path.write_text(json.dumps({"protocols": {"linear": {"top1": 50.0}}, "complete": False}))
    assert not _finished_evaluation(path), "a partial file must be evaluated again"
    path.write_text('{"protocols": {')  # cut short
    assert not _finished_evaluation(path)
    path.write_text(json.dumps({"protocols": {}, "complete": True}))
    assert _finished_evaluation(path)
    path.write_text(json.dumps({"protocols": {}}))  # written before files said whether whole
    assert _finished_evaluation(path)
