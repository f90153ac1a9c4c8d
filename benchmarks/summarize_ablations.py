"""Mean ± std over seeds of ablation runs, as a Markdown table.

    python benchmarks/summarize_ablations.py benchmarks/results/cpu_*.json

Reads the JSON files of ``benchmarks/ablate_look.py`` (any number; a run that appears in several
files, same name, budget and seed, counts once) and prints one row per setting: the number of seeds, the
fine-label linear probe and kNN-20 accuracy (mean ± sample standard deviation) and the fraction of
saturated LOOK queries in the last epoch.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _ablation_rows import load_runs


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def summarize(paths: list[Path]) -> str:
    runs = load_runs(paths)
    names = sorted({run["name"] for run in runs})
    lines = [
        "| setting | seeds | fine linear probe | fine kNN k=20 | saturated queries |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in names:
        rows = [run for run in runs if run["name"] == name]
        saturated = [row["saturated_frac"] for row in rows if row.get("saturated_frac") is not None]
        lines.append(
            f"| {name} | {len(rows)} | {_mean_std([r['linear_top1'] for r in rows])} | "
            f"{_mean_std([r['knn20_top1'] for r in rows])} | "
            + (f"{100 * statistics.mean(saturated):.1f} %" if saturated else "—")
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path)
    print(summarize(parser.parse_args().inputs))


if __name__ == "__main__":
    main()
