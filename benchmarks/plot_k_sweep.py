"""Transfer accuracy and saturated queries against LOOK's k, one line per temperature.

    python benchmarks/plot_k_sweep.py --output docs/figures/k_sweep.png \
        benchmarks/results/cpu_fmnist_coarse_*.json

Reads the JSON files that ``benchmarks/ablate_look.py`` writes. Takes the LOOK runs at the demo's
budget (the files' plan: 10,000 images, 3 epochs) that set only k and the temperature (runs that
also change another option, e.g. ``memory_init``, are other experiments), and draws the mean
fine-label linear probe (standard deviation over seeds as error bars) and the fraction of
saturated queries (all k neighbours share the label: zero loss) against k, on a log axis. CE and
NCA (k = every row) at the same budget are horizontal references. Prints the points as a table.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib
import yaml
from _ablation_rows import load_runs, plot_arguments, save_figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# Options a run of the k sweep may set; a run that sets anything else is another experiment.
# (Rows written before an explicit k replaced the recipe's k_fraction carry both; their name
# holds the k they ran with.)
_SWEEP_OPTIONS = {"name", "k", "k_fraction", "temperature", "head_hidden_dim", "head_out_dim"}
_K_IN_NAME = re.compile(r"^look_k(\d+)(?:_|$)")
_BUDGET = {"epochs": 3, "train_subset": 10_000}

Points = dict[float, dict[int, list[dict[str, Any]]]]


def _method(run: dict[str, Any]) -> dict[str, Any]:
    method = yaml.safe_load(run.get("method") or "{}")
    return method if isinstance(method, dict) else {}


def load_sweep(paths: list[Path]) -> tuple[Points, dict[str, list[float]]]:
    """``({temperature: {k: [runs]}}, {reference label: [linear probe over seeds]})``."""
    sweep: Points = defaultdict(lambda: defaultdict(list))
    references: dict[str, list[float]] = defaultdict(list)
    for run in load_runs(paths):
        if any(run[key] != value for key, value in _BUDGET.items()):
            continue
        method = _method(run)
        name = method.get("name", run["name"].split("_")[0])
        if run["name"] == "ce":
            references["CE"].append(float(run["linear_top1"]))
        elif name == "nca" and set(method) <= _SWEEP_OPTIONS:
            references[f"NCA (k = all), τ = {method.get('temperature')}"].append(
                float(run["linear_top1"])
            )
        elif name == "look" and set(method) <= _SWEEP_OPTIONS:
            named = _K_IN_NAME.match(run["name"])
            k = int(named.group(1)) if named else method.get("k")
            if k:
                sweep[float(method.get("temperature", 0.1))][int(k)].append(run)
    return sweep, references


def plot(sweep: Points, references: dict[str, list[float]], output: Path) -> None:
    figure, (probe_axis, saturation_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for temperature, by_k in sorted(sweep.items()):
        ks = sorted(by_k)
        if len(ks) < 2:  # a single k is a temperature experiment, not a sweep
            continue
        probes = [[float(r["linear_top1"]) for r in by_k[k]] for k in ks]
        probe_axis.errorbar(
            ks, [statistics.mean(p) for p in probes],
            yerr=[statistics.stdev(p) if len(p) > 1 else 0.0 for p in probes],
            marker="o", capsize=3, label=f"LOOK, τ = {temperature}",
        )  # fmt: skip
        saturation = [
            100 * statistics.mean(float(r.get("saturated_frac", 0.0)) for r in by_k[k]) for k in ks
        ]
        saturation_axis.plot(ks, saturation, marker="o", label=f"LOOK, τ = {temperature}")
    for (label, values), style in zip(sorted(references.items()), ("--", ":", "-."), strict=False):
        mean = statistics.mean(values)
        probe_axis.axhline(
            mean, linestyle=style, color="grey", label=f"{label} ({len(values)} seeds)"
        )
        if len(values) > 1:
            spread = statistics.stdev(values)
            probe_axis.axhspan(mean - spread, mean + spread, color="grey", alpha=0.12)
    probe_axis.set_ylabel("fine-label linear probe (%)")
    saturation_axis.set_ylabel("saturated queries, last epoch (%)")
    for axis in (probe_axis, saturation_axis):
        axis.set_xscale("log")
        axis.set_xlabel("k (neighbours)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    probe_axis.set_title("Fashion-MNIST coarse → fine, 10,000 images, 3 epochs")
    save_figure(figure, output)
    plt.close(figure)


def main() -> None:
    args = plot_arguments(__doc__.splitlines()[0])
    sweep, references = load_sweep(args.inputs)
    if not any(len(by_k) > 1 for by_k in sweep.values()):
        raise SystemExit("no LOOK runs with two or more values of k in the inputs")
    plot(sweep, references, args.output)
    print("| τ | k | seeds | linear probe | kNN k=20 | saturated | dropped |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for temperature, by_k in sorted(sweep.items()):
        for k, runs in sorted(by_k.items()):

            def mean(key: str, runs: list[dict[str, Any]] = runs) -> float:
                return statistics.mean(float(r.get(key, 0.0)) for r in runs)

            spread = (
                f" ± {statistics.stdev(float(r['linear_top1']) for r in runs):.2f}"
                if len(runs) > 1
                else ""
            )
            print(
                f"| {temperature} | {k} | {len(runs)} | {mean('linear_top1'):.2f}{spread} | "
                f"{mean('knn20_top1'):.2f} | {100 * mean('saturated_frac'):.1f} % | "
                f"{100 * mean('dropped_frac'):.1f} % |"
            )
    for label, values in sorted(references.items()):
        print(f"{label}: {statistics.mean(values):.2f} over {len(values)} seeds")


if __name__ == "__main__":
    main()
