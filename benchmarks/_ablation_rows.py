"""Reading the result files of ``ablate_look.py`` (shared by the scripts that summarise and plot
them)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def load_runs(paths: list[Path]) -> list[dict[str, Any]]:
    """Every run in ``paths``, with ``epochs`` and ``train_subset`` filled in from the file's plan
    where the row lacks them. A run found in several files (same name, budget and seed) counts
    once: the last file read wins."""
    runs: dict[tuple[str, int, int, int], dict[str, Any]] = {}
    for path in paths:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "rows" not in data:
            raise SystemExit(
                f"{path} is not a result file of ablate_look.py (it has no 'rows'); pass only "
                "those, e.g. benchmarks/results/cpu_fmnist_coarse_*.json"
            )
        plan = data.get("plan", {})
        for row in data["rows"]:
            run = {
                **row,
                "epochs": int(row.get("epochs", plan.get("epochs", 0))),
                "train_subset": int(row.get("train_subset", plan.get("train_subset", 0))),
                "seed": int(row.get("seed", 0)),
            }
            runs[(run["name"], run["epochs"], run["train_subset"], run["seed"])] = run
    return [runs[key] for key in sorted(runs)]


def plot_arguments(description: str) -> argparse.Namespace:
    """``inputs`` (result files) and ``--output`` (the figure), for the scripts that plot them."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("inputs", nargs="+", type=Path)
    parser.add_argument("--output", required=True, type=Path)
    return parser.parse_args()


def save_figure(figure: Any, output: Path) -> None:
    """Write a matplotlib figure to ``output``, its folder created."""
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
