"""Mean ± std over seeds of ablation runs, as a Markdown table.

    python benchmarks/summarize_ablations.py benchmarks/results/cpu_fmnist_coarse_*.json

Reads the JSON files of ``benchmarks/ablate_look.py`` (any number; a run that appears in several
files, same name, budget and seed, counts once) and prints one row per setting: the number of seeds, the
fine-label linear probe and kNN-20 accuracy (mean ± sample standard deviation) and the fraction of
saturated LOOK queries in the last epoch.

    python benchmarks/summarize_ablations.py --paired-with ce benchmarks/results/cpu_fmnist_coarse_*.json

adds, per setting, its linear-probe and kNN-20 difference with the ``ce`` runs of the same budget
and seeds: the mean paired difference and its 95 % confidence interval (Student's t, as
``look report --baseline``), and the verdict (``better``/``worse`` only when the interval
excludes zero).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _ablation_rows import load_runs

from look.analysis.compare import NO_INTERVAL, PairedComparison


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _paired(rows: list[dict], reference: list[dict], metric: str, name: str, base: str) -> str:
    theirs = {(r["epochs"], r["train_subset"], r["seed"]): r[metric] for r in reference}
    pairs = sorted(
        (row["seed"], row[metric] - theirs[key])
        for row in rows
        if (key := (row["epochs"], row["train_subset"], row["seed"])) in theirs
    )
    if not pairs:
        return "—"
    seeds, differences = zip(*pairs, strict=True)
    comparison = PairedComparison("", metric, name, base, seeds, differences)
    if comparison.verdict == NO_INTERVAL:
        return f"{comparison.difference_text()} (1 seed)"
    return f"{comparison.difference_text()} {comparison.verdict}"


def summarize(paths: list[Path], paired_with: str | None = None) -> str:
    runs = load_runs(paths)
    names = sorted({run["name"] for run in runs})
    header = "| setting | seeds | fine linear probe | fine kNN k=20 | saturated queries |"
    rule = "| --- | --- | --- | --- | --- |"
    reference = [run for run in runs if run["name"] == paired_with]
    if paired_with is not None:
        if not reference:
            raise SystemExit(f"--paired-with {paired_with!r}: no run of that name in the inputs")
        header += f" linear − {paired_with} [95 % CI] | kNN-20 − {paired_with} [95 % CI] |"
        rule += " --- | --- |"
    lines = [header, rule]
    for name in names:
        rows = [run for run in runs if run["name"] == name]
        saturated = [row["saturated_frac"] for row in rows if row.get("saturated_frac") is not None]
        line = (
            f"| {name} | {len(rows)} | {_mean_std([r['linear_top1'] for r in rows])} | "
            f"{_mean_std([r['knn20_top1'] for r in rows])} | "
            + (f"{100 * statistics.mean(saturated):.1f} %" if saturated else "—")
            + " |"
        )
        if paired_with is not None:
            line += "".join(
                f" {'—' if name == paired_with else _paired(rows, reference, m, name, paired_with)} |"
                for m in ("linear_top1", "knn20_top1")
            )
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path)
    parser.add_argument(
        "--paired-with",
        metavar="NAME",
        help="add each setting's paired difference with the runs of this setting (same budget "
        "and seeds), with a 95%% confidence interval",
    )
    args = parser.parse_args()
    print(summarize(args.inputs, args.paired_with))


if __name__ == "__main__":
    main()
