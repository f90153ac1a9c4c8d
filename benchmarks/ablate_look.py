"""LOOK ablation on the demo's coarse → fine task: why does LOOK learn more slowly than CE?

    python benchmarks/ablate_look.py --output ablation.json \
        --set method.k=20,200,1000 --set method.temperature=0.1,0.5 [--epochs 3] [--seeds 0 1 2]

Every combination of the ``--set`` values (comma-separated; ``method.*`` keys change the method,
any other key, e.g. ``optim.weight_decay``, the shared recipe) is pre-trained with the demo's recipe
(`look.demo.pretrain_config`: same backbone, data subset, epochs and optimiser as the demo), then
evaluated on the fine labels (linear probe, kNN k=20). For each run it also records the training
signals that test the "vanishing gradient" hypothesis, averaged over the last epoch's logged steps:
``saturated_frac`` (queries whose k neighbours all share their label: zero loss, zero gradient),
``dropped_frac`` (no positive among the neighbours) and ``neighbour_agreement``. ``--baseline ce``
adds CE rows for comparison. Writes JSON and prints a Markdown table (also written next to the
JSON).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import yaml

from look.config import apply_overrides
from look.data import DataSpec
from look.demo import DemoPlan, pretrain_config
from look.engine.metrics_log import read_metrics
from look.engine.trainer import pretrain
from look.evaluation import ModelSource, evaluate

SIGNALS = ("saturated_frac", "dropped_frac", "neighbour_agreement", "loss")


def _grid(sets: list[str]) -> list[dict[str, Any]]:
    axes: list[list[str]] = []
    for text in sets:
        key, _, values = text.partition("=")
        if not key or not values:
            raise SystemExit(f"--set {text!r}: expected key=v1,v2,...")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [dict(enumerate(combo)) for combo in itertools.product(*axes)] if axes else [{}]


def _last_epoch_means(run_dir: Path) -> dict[str, float]:
    rows = read_metrics(run_dir, split="train")
    if not rows:
        return {}
    last_epoch = max(row.get("epoch", 0) for row in rows)
    tail = [row for row in rows if row.get("epoch", 0) == last_epoch]
    return {
        name: sum(row[name] for row in tail) / len(tail)
        for name in SIGNALS
        if all(name in row for row in tail)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSON file for the results")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=V1,V2")
    parser.add_argument("--method", default="look")
    parser.add_argument("--baseline", action="append", default=[], help="e.g. ce")
    parser.add_argument("--epochs", type=int, default=DemoPlan.default().epochs)
    parser.add_argument("--train-subset", type=int, default=DemoPlan.default().train_subset)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=DemoPlan.default().num_workers)
    parser.add_argument("--workdir", default="runs/ablation")
    args = parser.parse_args()

    plan = replace(
        DemoPlan.default(),
        epochs=args.epochs,
        train_subset=args.train_subset,
        num_workers=args.num_workers,
    )
    workdir = Path(args.workdir)
    jobs = [(args.method, combo) for combo in _grid(args.sets)]
    jobs += [(baseline, {}) for baseline in args.baseline]
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        for method, combo in jobs:
            overrides = [o for o in combo.values() if o.startswith("method.")]
            recipe = tuple(o for o in combo.values() if not o.startswith("method."))
            cfg = pretrain_config(plan, method, "coarse", seed, args.device, recipe)
            if any(o.startswith("method.k=") for o in overrides):
                cfg.method.pop("k_fraction", None)  # an explicit k replaces the recipe's fraction
            method_values = apply_overrides({"method": cfg.method}, overrides)["method"]
            cfg.method = method_values
            name = "_".join(
                [
                    method,
                    *(o.replace("method.", "").replace("=", "") for o in overrides),
                    *(o.rpartition(".")[2].replace("=", "") for o in recipe),
                ]
            )
            # The budget is part of the name, so runs of another length are never reused.
            default_plan = DemoPlan.default()
            if plan.epochs != default_plan.epochs:
                name += f"_e{plan.epochs}"
            if plan.train_subset != default_plan.train_subset:
                name += f"_n{plan.train_subset}"
            run_dir = workdir / f"{name}_s{seed}"
            started = time.perf_counter()
            if not (run_dir / "summary.json").exists():
                pretrain(cfg, run_dir)
            train_seconds = time.perf_counter() - started
            result = evaluate(
                ModelSource(checkpoint=run_dir),
                DataSpec(dataset="fashion_mnist", subset=plan.probe_train_subset),
                ("linear", "knn"),
                labels="fine",
                output_dir=run_dir / "eval_fine",
                cache_dir=workdir / "cache",
                seed=seed,
                progress=False,
            )
            knn = {e["k"]: e["top1"] for e in result["protocols"]["knn"]["results"]}
            rows.append(
                {
                    "name": name,
                    "seed": seed,
                    "method": yaml.safe_dump(method_values, default_flow_style=True).strip(),
                    "linear_top1": result["protocols"]["linear"]["top1"],
                    "knn20_top1": knn.get(20),
                    "train_seconds": train_seconds,
                    **_last_epoch_means(run_dir),
                }
            )
            print(json.dumps(rows[-1]))
    output = Path(args.output)
    output.write_text(json.dumps({"plan": asdict(plan), "rows": rows}, indent=2, default=str))
    header = ["name", "seed", "linear_top1", "knn20_top1", *SIGNALS]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [
            f"{row[h]:.3f}" if isinstance(row.get(h), float) else str(row.get(h, "—"))
            for h in header
        ]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    output.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
