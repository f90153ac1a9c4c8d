"""Transfer accuracy against pre-training length, one line per method, from ablation results.

    python benchmarks/plot_training_length.py --output docs/figures/training_length.png \
        benchmarks/results/cpu_fmnist_coarse_*.json benchmarks/results/h100_fmnist_coarse_full.json

Reads the JSON files that ``benchmarks/ablate_look.py`` writes (``{"plan": {...}, "rows": [...]}``)
or plain ``{"rows": [...]}`` files whose rows carry ``epochs`` and ``train_subset``. One panel per
training-set size; a point is the mean fine-label linear-probe accuracy of a method at an epoch
budget, with the standard deviation over seeds as an error bar when there are several.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib
from _ablation_rows import load_runs, plot_arguments, save_figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def load_points(paths: list[Path]) -> dict[int, dict[str, dict[int, list[float]]]]:
    """``{train_subset: {method label: {epochs: [accuracies over seeds]}}}``."""
    points: dict[int, dict[str, dict[int, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for run in load_runs(paths):
        epochs, subset = run["epochs"], run["train_subset"]
        label = str(run.get("label") or run["name"])
        for suffix in (f"_e{epochs}", f"_n{subset}"):
            label = label.replace(suffix, "")
        points[subset][label][epochs].append(float(run["linear_top1"]))
    return points


def plot(points: dict[int, dict[str, dict[int, list[float]]]], output: Path) -> None:
    subsets = sorted(points)
    figure, axes = plt.subplots(1, len(subsets), figsize=(5.5 * len(subsets), 4), squeeze=False)
    for axis, subset in zip(axes[0], subsets, strict=True):
        for label, by_epochs in sorted(points[subset].items()):
            epochs = sorted(by_epochs)
            means = [statistics.mean(by_epochs[e]) for e in epochs]
            errors = [
                statistics.stdev(by_epochs[e]) if len(by_epochs[e]) > 1 else 0 for e in epochs
            ]
            axis.errorbar(epochs, means, yerr=errors, marker="o", capsize=3, label=label)
        axis.set_title(f"Fashion-MNIST coarse, {subset:,} training images")
        axis.set_xlabel("pre-training epochs")
        axis.set_ylabel("fine-label linear probe (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    save_figure(figure, output)
    plt.close(figure)


def main() -> None:
    args = plot_arguments(__doc__.splitlines()[0])
    points = load_points(args.inputs)
    if not points:
        raise SystemExit("no rows found in the inputs")
    plot(points, args.output)
    for subset, methods in sorted(points.items()):
        for label, by_epochs in sorted(methods.items()):
            summary = ", ".join(
                f"{e} ep: {statistics.mean(v):.2f} (n={len(v)})"
                for e, v in sorted(by_epochs.items())
            )
            print(f"{subset:>6} images  {label:<24} {summary}")


if __name__ == "__main__":
    main()
