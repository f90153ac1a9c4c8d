from __future__ import annotations

import json
from pathlib import Path

import pytest

from look.demo import (
    METHODS_SCENARIO_1,
    SCENARIO_COARSE,
    SCENARIO_DIGITS,
    DemoPlan,
    _verdict,
    plan_runs,
    pretrain_config,
)
from look.methods import get_method_class


@pytest.mark.parametrize("plan", [DemoPlan.default(), DemoPlan.quick()], ids=["default", "quick"])
def test_every_demo_run_has_a_valid_config(plan: DemoPlan) -> None:
    runs = plan_runs(plan)
    names = {(r.scenario, r.name) for r in runs}
    for method in METHODS_SCENARIO_1:
        assert (SCENARIO_COARSE, f"{method} (coarse)") in names
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
        options = get_method_class(run.method).parse_options(cfg.method)
        if run.method == "look":
            assert options.k_fraction == plan.look_k_fraction
            assert plan.look_k_fraction is not None or options.k == plan.look_k


def test_the_verdict_states_wins_and_losses_from_the_numbers() -> None:
    scores = {
        "look (coarse)": {"linear": 80.0},
        "ce (coarse)": {"linear": 82.5},
        "nca (coarse)": {"linear": 79.0},
    }
    text = _verdict(scores, "linear", "look (coarse)", ["ce (coarse)", "nca (coarse)"])
    assert "loses to ce (coarse) (80.00 vs 82.50)" in text
    assert "beats nca (coarse) (80.00 vs 79.00)" in text


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path) -> None:
    from look.demo import run_demo

    report = run_demo(tmp_path, plan=DemoPlan.quick(), device="cpu")
    text = report.read_text()
    assert "Verdict" in text and "look (coarse)" in text
    assert (tmp_path / "analysis" / "maps.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "timings.json").read_text())["total"] > 0
