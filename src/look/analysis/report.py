"""Reports: collect evaluation results over methods and seeds into REPORT.md, report.json, report.csv.

Inputs (files, or directories searched recursively):

- ``results.json`` — one (model, dataset) evaluation; both the evaluation's own format and a compact
  shape are read, tolerantly: see :mod:`look.analysis.results` for the schema, which keys are
  metrics (accuracies, in percent), which are headline metrics, and how runs get their method
  label and seed.
- ``multimodality.json`` — written by ``look analyze`` (:mod:`look.analysis.analyze`): its
  ``"feature_sets"`` entries (``name``, ``model``, ``dataset``, ``summary``) give multi-modality
  rows, and its ``"figures"`` (PNG paths relative to the file) are copied into the report and
  embedded. A ``"multimodality"`` entry inside a ``results.json`` counts too.

Runs are grouped by method label and dataset (image folders by their root: see
:mod:`look.analysis.results`; two roots with the same folder name are told apart by their full
path); within a group every input file is one sample (one seed): a cell is ``mean ± std (n
seeds)``, std being the sample standard deviation (``n − 1``; none for a single seed), with the
``k`` a kNN column really used when the training split was smaller (``(1 seed, k = 54)``). Two
files with the same seed in one group are named in a :class:`RepeatedSeedWarning`. A few-shot
cell with a single seed shows that run's 95 % confidence interval over its episodes instead of a
std, and says so in the cell (``70.00 ± 0.41 (95 % CI over 600 episodes, 1 seed)``).

**Settings**: the runs averaged into one row must share their settings (:func:`look.analysis.
results.run_settings`: pre-training data, labels, size and length, evaluation image size and label
set, protocol settings; never the seed or paths). Where they do not, the row's cells are marked
``⚠N`` and a *Warnings* section of REPORT.md says which setting differs, with its values and
files; so does a :class:`MixedSettingsWarning` (and ``report.json``'s ``"settings_conflicts"``).
A cell holding a result ``look evaluate`` warned about (a linear probe's iterations run out or its
C at an end of the grid, few-shot episodes below the protocol's 600) is marked ``†``, with the
files and problems under *Evaluation warnings*.
Rows of one dataset evaluated with different evaluation settings (another kNN τ, image size or
grouping file under the same short name) are marked the same way, since their cells, the bold best
and the paired differences then compare unlike evaluations. Headline
metrics are the Markdown columns (dataset × protocol, accuracies in %); every metric goes to
report.json/report.csv, with the same numbers. The best mean of a column with two or more
methods is bold, and so is every mean that shows the same digits (for multi-modality: purity,
separability and ARI; not the cluster count); a method
without a value shows ``—``. One bar chart per dataset (``figures/bars_<dataset>.png``: protocols ×
methods) is embedded by a relative link.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import shutil
import statistics
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from look.analysis.compare import (
    BETTER,
    WORSE,
    PairedComparison,
    UnpairedSeedsWarning,
    compare_with_baseline,
    mean_per_seed,
)
from look.analysis.results import (
    RESULTS_FILE_NAME,
    EvaluationResult,
    ReportInputWarning,
    canonical_setting,
    describe_model,
    method_label,
    multimodality_summary,
    read_json_object,
    read_results_file,
    setting_protocol,
)
from look.atomic import atomic_write_path, atomic_write_text

__all__ = [
    "MULTIMODALITY_FILE_NAME",
    "MULTIMODALITY_METRICS",
    "Cell",
    "MixedSettingsWarning",
    "RepeatedSeedWarning",
    "ReportOutputs",
    "SettingsConflict",
    "aggregate_cells",
    "find_report_inputs",
    "find_settings_conflicts",
    "format_cell",
    "metric_header",
    "read_multimodality_file",
    "write_report",
]

MULTIMODALITY_FILE_NAME = "multimodality.json"
DEFAULT_TITLE = "LOOK transfer evaluation"
MISSING = "—"
_PROTOCOL_ORDER = ("linear", "knn", "fewshot", "finetune")
_PROTOCOL_NAMES = {"linear": "linear", "knn": "kNN", "fewshot": "few-shot", "finetune": "fine-tune"}
_HEADLINE_LEAVES = ("top1", "mean", "mean_accuracy")
# Multi-modality columns: metric key → (header, whether larger means "more fine structure kept").
# Both ARIs are shown: "ari" scores the silhouette-chosen clustering, so it is 0 by construction
# whenever one cluster is chosen (no structure found, or structure unrelated to the fine labels
# read alike); "ari_at_fine_count" (KMeans with k = the number of fine classes) asks whether the
# fine classes can be found as clusters at all, and is the one to compare methods by.
MULTIMODALITY_METRICS: dict[str, tuple[str, bool]] = {
    "knn_purity": ("fine kNN purity (%)", True),
    "separability": ("fine linear separability (%)", True),
    "cluster_count": ("clusters per coarse class", False),
    "ari": ("ARI chosen clusters vs fine", True),
    "ari_at_fine_count": ("ARI at fine count", True),
}
# Shown ×100 with one decimal (fractions), or as they are.
_MULTIMODALITY_PERCENT = {
    "knn_purity": True,
    "separability": True,
    "cluster_count": False,
    "ari": False,
    "ari_at_fine_count": False,
    "knn_purity_chance": True,
    "separability_chance": True,
}
_MULTIMODALITY_DIGITS = {
    "knn_purity": 1,
    "separability": 1,
    "cluster_count": 2,
    "ari": 3,
    "ari_at_fine_count": 3,
    "knn_purity_chance": 1,
    "separability_chance": 1,
}
_CHANCE_METRICS = {"knn_purity": "knn_purity_chance", "separability": "separability_chance"}
_CHANCE_HEADERS = {
    "knn_purity_chance": "fine kNN purity chance (%)",
    "separability_chance": "fine linear separability chance (%)",
}
# Label set of the multi-modality rows of a feature set without coarse labels: their dataset
# label becomes "digits (whole set)", a column apart from the intra-coarse measures.
WHOLE_SET_LABELS = "whole set"
# Prefix of the analysis settings of a multimodality.json row (look analyze's "settings").
MULTIMODALITY_SETTING = "multimodality."


class RepeatedSeedWarning(ReportInputWarning):
    """Several input files give one report row the same seed: each still counts as a sample."""


class MixedSettingsWarning(ReportInputWarning):
    """The runs averaged into one report row (or the rows of one dataset) differ in a setting
    that must agree, such as the pre-training data or a protocol option."""


# Settings of the evaluation side, which the rows of one dataset must share to be compared.
_EVALUATION_SETTING_PREFIXES = (
    "labels.evaluation",
    "dataset.",
    "protocol_settings.",
    "protocols.",
    MULTIMODALITY_SETTING,
)
_VALUE_CHARS = 60  # a long value (a class-name list) is cut in messages
_FILES_SHOWN = 3


@dataclasses.dataclass(frozen=True)
class SettingsConflict:
    """A ``setting`` (a path of :func:`look.analysis.results.run_settings`) with several values
    among the runs of one report row (``within_row``) or among the rows of one dataset.

    ``values`` maps each value (canonical JSON) to the ``(row label, file)`` of the runs with it.
    """

    dataset: str
    setting: str
    within_row: bool
    values: tuple[tuple[str, tuple[tuple[str, Path], ...]], ...]

    @property
    def methods(self) -> tuple[str, ...]:
        """The rows whose runs take part."""
        return tuple(dict.fromkeys(m for _, runs in self.values for m, _ in runs))

    @property
    def protocol(self) -> str | None:
        """The protocol whose cells the setting concerns; ``None`` for all of them."""
        return setting_protocol(self.setting)

    def concerns(self, cell: Cell) -> bool:
        """Whether ``cell`` mixes (or is compared across) the runs of this conflict."""
        if cell.dataset != self.dataset or cell.method not in self.methods:
            return False
        if self.setting.startswith(MULTIMODALITY_SETTING):  # look analyze's own settings
            return cell.table == "multimodality"
        if self.protocol is None:
            return True
        return cell.table == "transfer" and cell.metric.split("/", 1)[0] == self.protocol

    def describe(self, *, markdown: bool = False) -> str:
        """``model.pretraining.dataset: "mnist" in a/results.json vs "fmnist" in b/results.json``."""
        quote = "`" if markdown else ""
        parts = []
        for value, runs in self.values:
            shown = value if len(value) <= _VALUE_CHARS else value[: _VALUE_CHARS - 3] + "..."
            files = [
                (f"{method}: " if not self.within_row else "") + f"{quote}{path}{quote}"
                for method, path in runs[:_FILES_SHOWN]
            ]
            if len(runs) > _FILES_SHOWN:
                files.append(f"{len(runs) - _FILES_SHOWN} more")
            parts.append(f"{quote}{shown}{quote} in {', '.join(files)}")
        return f"{quote}{self.setting}{quote}: " + " vs ".join(parts)

    def as_row(self) -> dict[str, Any]:
        """The conflict as a JSON object."""
        return {
            "dataset": self.dataset,
            "setting": self.setting,
            "within_row": self.within_row,
            "methods": list(self.methods),
            "values": [
                {
                    "value": json.loads(value),
                    "inputs": [{"method": m, "file": str(path)} for m, path in runs],
                }
                for value, runs in self.values
            ],
        }


@dataclasses.dataclass(frozen=True)
class Cell:
    """One aggregated value: a method's metric on a dataset over its seeds.

    ``k_effective`` are the neighbour counts a kNN metric really used where the training split
    was smaller than its ``k`` (empty otherwise). ``episode_ci95`` is, for a cell of one run with a
    recorded ``ci95`` next to it (few-shot), that run's 95 % confidence interval over its
    ``episodes`` (shown instead of the std a single seed lacks). ``mixed_settings`` are the
    :class:`SettingsConflict` s the cell's runs take part in, ``problems`` the ``(file,
    problem)`` of its runs whose protocol ``look evaluate`` warned about
    (:func:`look.analysis.results.protocol_problems`).
    """

    table: str  # "transfer" or "multimodality"
    method: str
    dataset: str  # display label, e.g. "cifar100 (coarse)"
    labels: str | None
    metric: str
    values: tuple[float, ...]
    seeds: tuple[int | None, ...]
    headline: bool = True
    best: bool = False
    k_effective: tuple[int, ...] = ()
    episode_ci95: float | None = None
    episodes: int | None = None
    mixed_settings: tuple[SettingsConflict, ...] = ()
    problems: tuple[tuple[str, str], ...] = ()

    @property
    def samples(self) -> tuple[float, ...]:
        """One value per seed: the mean of the runs that share a seed (a model evaluated twice
        is one sample of the seed-to-seed spread, not two), in order of first appearance; a
        run without a recorded seed is a sample of its own."""
        per_seed = mean_per_seed(self.seeds, self.values)
        unseeded = [v for s, v in zip(self.seeds, self.values, strict=True) if s is None]
        return (*per_seed.values(), *unseeded)

    @property
    def n(self) -> int:
        """Number of samples (seeds)."""
        return len(self.samples)

    @property
    def runs(self) -> int:
        """Number of runs (results files) behind the samples."""
        return len(self.values)

    @property
    def mean(self) -> float:
        """Mean over the samples."""
        return math.fsum(self.samples) / self.n

    @property
    def std(self) -> float | None:
        """Sample standard deviation (``n − 1``) over seeds, ``None`` for a single seed."""
        return statistics.stdev(self.samples) if self.n > 1 else None

    def as_row(self) -> dict[str, Any]:
        """The cell as a JSON/CSV row."""
        return {
            "table": self.table,
            "method": self.method,
            "dataset": self.dataset,
            "labels": self.labels,
            "metric": self.metric,
            "mean": self.mean,
            "std": self.std,
            "n": self.n,
            "runs": self.runs,
            "seeds": list(self.seeds),
            "values": list(self.values),
            "headline": self.headline,
            "best": self.best,
            "k_effective": list(self.k_effective),
            "episode_ci95": self.episode_ci95,
            "episodes": self.episodes,
            "mixed_settings": sorted({c.setting for c in self.mixed_settings}),
            "problems": [f"{path}: {problem}" for path, problem in self.problems],
        }


@dataclasses.dataclass(frozen=True)
class ReportOutputs:
    """Files written by :func:`write_report`."""

    markdown: Path
    json: Path
    csv: Path
    figures: tuple[Path, ...]
    cells: tuple[Cell, ...]


def _natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _metric_order(metric: str) -> tuple[int, list[Any]]:
    protocol = metric.split("/", 1)[0]
    rank = _PROTOCOL_ORDER.index(protocol) if protocol in _PROTOCOL_ORDER else len(_PROTOCOL_ORDER)
    return rank, _natural_key(metric)


def metric_header(metric: str) -> str:
    """Column name of a headline metric: the protocol path without its ``top1``/``mean`` leaf."""
    parts = metric.split("/")
    per_class = len(parts) > 1 and parts[-1] == "mean_per_class_accuracy"
    if len(parts) > 1 and (parts[-1] in _HEADLINE_LEAVES or per_class):
        parts = parts[:-1]
    parts[0] = _PROTOCOL_NAMES.get(parts[0], parts[0])
    return " ".join(parts) + (" (mean/class)" if per_class else "")


def _is_whole_set(entry: Mapping[str, Any]) -> bool:
    """Whether a feature set was measured without coarse labels (one group: the whole set).
    Files written before ``"scope"`` was recorded named that one group ``"all classes"``."""
    if "scope" in entry:
        return entry.get("scope") == "whole-set"
    per_coarse = entry.get("per_coarse")
    return isinstance(per_coarse, Mapping) and list(per_coarse) == ["all classes"]


def multimodality_settings(content: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, str]:
    """The analysis settings of one ``multimodality.json`` row that must agree for its numbers to
    be compared (``"multimodality.k"`` → canonical JSON): the file's ``"settings"`` except the
    maps' (they change no number), and the row's coarse grouping."""
    found: dict[str, str] = {}
    settings = content.get("settings")
    if isinstance(settings, Mapping):
        for key, value in settings.items():
            if key != "maps":
                found[f"{MULTIMODALITY_SETTING}{key}"] = canonical_setting(value)
    if entry.get("grouping") is not None:
        found[f"{MULTIMODALITY_SETTING}grouping"] = canonical_setting(entry["grouping"])
    return found


def read_multimodality_file(path: str | Path) -> tuple[list[EvaluationResult], list[Path]]:
    """Rows (one per feature set) and the existing figure paths of a ``multimodality.json``.

    A row's ``settings`` are :func:`multimodality_settings`; a feature set measured over its
    whole set (no coarse labels) gets the label set :data:`WHOLE_SET_LABELS`, which keeps it in
    columns of its own (``"digits (whole set)"``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"multimodality file {path} does not exist")
    content = read_json_object(path)
    rows: list[EvaluationResult] = []
    for entry in content.get("feature_sets") or []:
        if not isinstance(entry, Mapping):
            continue
        model = describe_model(entry.get("model")) if entry.get("model") else {}
        rows.append(
            EvaluationResult(
                source=path,
                method=method_label(model) if model else str(entry.get("name") or "unknown"),
                seed=model.get("seed"),
                dataset=str(entry.get("dataset") or "unknown"),
                labels=WHOLE_SET_LABELS if _is_whole_set(entry) else None,
                metrics={},
                multimodality=multimodality_summary(entry),
                model=model,
                settings=multimodality_settings(content, entry),
            )
        )
    figures = [path.parent / str(name) for name in content.get("figures") or []]
    return rows, [figure for figure in figures if figure.is_file()]


def find_report_inputs(paths: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """``results.json`` and ``multimodality.json`` files given directly or found under directories.

    A file given directly is a results file unless it is named ``multimodality.json``.
    ``FileNotFoundError`` for a path that does not exist or when nothing is found.
    """
    results: list[Path] = []
    multimodality: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            results.extend(sorted(path.rglob(RESULTS_FILE_NAME)))
            multimodality.extend(sorted(path.rglob(MULTIMODALITY_FILE_NAME)))
        elif path.is_file():
            (multimodality if path.name == MULTIMODALITY_FILE_NAME else results).append(path)
        else:
            raise FileNotFoundError(f"{path} is neither a results file nor a directory")
    results = list(dict.fromkeys(p.resolve() for p in results))
    multimodality = list(dict.fromkeys(p.resolve() for p in multimodality))
    if not results and not multimodality:
        raise FileNotFoundError(
            f"no {RESULTS_FILE_NAME} or {MULTIMODALITY_FILE_NAME} found in "
            f"{[str(p) for p in paths]}; pass evaluation output folders or result files"
        )
    return results, multimodality


def _shown_mean(cell: Cell) -> str:
    """The mean as its table shows it (multi-modality fractions ×100, per-metric digits)."""
    scale = (
        100.0 if cell.table == "multimodality" and _MULTIMODALITY_PERCENT.get(cell.metric) else 1
    )
    digits = _MULTIMODALITY_DIGITS.get(cell.metric, 2) if cell.table == "multimodality" else 2
    return f"{cell.mean * scale:.{digits}f}"


def _mark_best(cells: list[Cell], larger_is_better: Mapping[str, bool] | None = None) -> list[Cell]:
    by_column: dict[tuple[str, str], list[int]] = {}
    for index, cell in enumerate(cells):
        if cell.headline:
            by_column.setdefault((cell.dataset, cell.metric), []).append(index)
    marked = list(cells)
    for (_, metric), indices in by_column.items():
        if len(indices) < 2 or (larger_is_better is not None and not larger_is_better.get(metric)):
            continue
        best = _shown_mean(max((cells[i] for i in indices), key=lambda c: c.mean))
        for i in indices:
            # Every mean that reads as the best is best: bolding one of two equal-looking numbers
            # would claim a difference the table does not show.
            if _shown_mean(cells[i]) == best:
                marked[i] = dataclasses.replace(cells[i], best=True)
    return marked


def _distinct_datasets(runs: Sequence[EvaluationResult]) -> list[EvaluationResult]:
    """Runs whose dataset name is shared by several roots (two image folders both called
    ``pets``) renamed after their full root, so that they are not averaged together."""
    roots: dict[str, set[str]] = {}
    for run in runs:
        if run.dataset_root is not None:
            roots.setdefault(run.dataset, set()).add(run.dataset_root)
    shared = {name for name, found in roots.items() if len(found) > 1}
    return [
        dataclasses.replace(run, dataset=f"{run.dataset.split(':', 1)[0]}:{run.dataset_root}")
        if run.dataset in shared and run.dataset_root is not None
        else run
        for run in runs
    ]


def _warn_repeated_seeds(
    groups: Mapping[tuple[str, str, str], list[tuple[float, int | None, EvaluationResult]]],
) -> None:
    """One :class:`RepeatedSeedWarning` per (row, dataset, seed) that several inputs share."""
    repeated: dict[tuple[str, str, int], list[Path]] = {}
    for (method, dataset, _), samples in groups.items():
        sources: dict[int, list[Path]] = {}
        for _, seed, run in samples:
            if seed is not None:
                sources.setdefault(seed, []).append(run.source)
        for seed, paths in sources.items():
            if len(paths) > 1:
                repeated.setdefault((method, dataset, seed), paths)
    for (method, dataset, seed), paths in repeated.items():
        warnings.warn(
            RepeatedSeedWarning(
                f"{len(paths)} inputs give {method!r} on {dataset} seed {seed}; they are "
                f"averaged into one seed of that row (its cells say 'N runs of M seeds'): "
                f"{', '.join(str(p) for p in paths)}. If they are different models that share "
                "the row label, give them labels of their own (look evaluate --label)"
            ),
            stacklevel=3,
        )


def _is_evaluation_setting(setting: str) -> bool:
    return setting == "labels" or setting.startswith(_EVALUATION_SETTING_PREFIXES)


def _uses_protocol(run: EvaluationResult, protocol: str | None) -> bool:
    """Whether a protocol's settings matter for ``run``: it has a metric of that protocol."""
    return protocol is None or any(m.split("/", 1)[0] == protocol for m in run.metrics)


def _conflicts_among(
    members: Sequence[EvaluationResult], dataset: str, *, within_row: bool, only_evaluation: bool
) -> list[SettingsConflict]:
    found = []
    names = dict.fromkeys(name for run in members for name in run.settings)
    for setting in names:
        if only_evaluation and not _is_evaluation_setting(setting):
            continue
        protocol = setting_protocol(setting)
        values: dict[str, list[tuple[str, Path]]] = {}
        for run in members:
            # A run that lacks the field (the compact shape) or the protocol is not compared.
            if setting in run.settings and _uses_protocol(run, protocol):
                values.setdefault(run.settings[setting], []).append((run.method, run.source))
        if len(values) > 1:
            found.append(
                SettingsConflict(
                    dataset,
                    setting,
                    within_row,
                    tuple((value, tuple(runs)) for value, runs in values.items()),
                )
            )
    return found


def find_settings_conflicts(runs: Iterable[EvaluationResult]) -> list[SettingsConflict]:
    """Settings that differ among the runs of one row (method × dataset), then evaluation
    settings that differ among the rows of one dataset (where each row agrees within itself).

    Runs are taken as :func:`aggregate_cells` groups them (give it the same runs).
    """
    rows: dict[tuple[str, str], dict[Path, EvaluationResult]] = {}
    for run in runs:
        rows.setdefault((run.method, run.dataset_label), {}).setdefault(run.source, run)
    conflicts: list[SettingsConflict] = []
    for (_, dataset), members in rows.items():
        conflicts += _conflicts_among(
            list(members.values()), dataset, within_row=True, only_evaluation=False
        )
    in_rows = {(c.dataset, c.setting) for c in conflicts}
    datasets: dict[str, list[EvaluationResult]] = {}
    for (_, dataset), members in rows.items():
        datasets.setdefault(dataset, []).extend(members.values())
    for dataset, members in datasets.items():
        conflicts += [
            c
            for c in _conflicts_among(members, dataset, within_row=False, only_evaluation=True)
            if (dataset, c.setting) not in in_rows  # already told, row by row
        ]
    return conflicts


def _warn_mixed_settings(conflicts: Sequence[SettingsConflict]) -> None:
    """One :class:`MixedSettingsWarning` per row (and per dataset) with differing settings."""
    groups: dict[tuple[str, str | None], list[SettingsConflict]] = {}
    for conflict in conflicts:
        groups.setdefault(_conflict_key(conflict), []).append(conflict)
    for (dataset, method), found in groups.items():
        listed = "; ".join(c.describe() for c in found)
        if method is not None:
            text = (
                f"{method!r} on {dataset} averages runs with different settings, so its mean "
                f"and std are not a spread over seeds of one setting: {listed}. Report each "
                "setting on its own (separate folders, or `look evaluate --label` per setting)"
            )
        else:
            text = (
                f"the rows of {dataset} were evaluated with different settings, so their cells, "
                f"the bold best and any paired difference compare unlike evaluations: {listed}. "
                "Evaluate every row with the same settings"
            )
        warnings.warn(MixedSettingsWarning(text), stacklevel=3)


def _episode_interval(
    metric: str, samples: Sequence[tuple[float, int | None, EvaluationResult]]
) -> tuple[float | None, int | None]:
    """The 95 % CI over episodes recorded beside a one-run headline metric (few-shot), and the
    episodes; ``(None, None)`` for several runs, whose spread is the std over seeds."""
    group, leaf = metric.rsplit("/", 1) if "/" in metric else (metric, "")
    if len(samples) != 1 or leaf == "ci95":
        return None, None
    run = samples[0][2]
    return run.metrics.get(f"{group}/ci95"), run.fewshot_episodes.get(group)


def aggregate_cells(runs: Iterable[EvaluationResult]) -> list[Cell]:
    """Transfer and multi-modality cells: values grouped by (method, dataset, metric) over seeds.

    Runs are taken in the given order; methods keep the order of their first appearance.
    Several inputs with one seed in a group give a :class:`RepeatedSeedWarning` naming them;
    runs of a group with differing settings (:func:`find_settings_conflicts`) a
    :class:`MixedSettingsWarning`, and their cells list the conflicts in ``mixed_settings``.
    """
    transfer: dict[tuple[str, str, str], list[tuple[float, int | None, EvaluationResult]]] = {}
    multimodal: dict[tuple[str, str, str], list[tuple[float, int | None, EvaluationResult]]] = {}
    headline_paths: set[str] = set()
    runs = _distinct_datasets(list(runs))
    conflicts = find_settings_conflicts(runs)
    for run in runs:
        headline_paths.update(run.headline)
        for metric, value in run.metrics.items():
            transfer.setdefault((run.method, run.dataset_label, metric), []).append(
                (value, run.seed, run)
            )
        for metric, value in run.multimodality.items():
            multimodal.setdefault((run.method, run.dataset_label, metric), []).append(
                (value, run.seed, run)
            )

    def build(table: str, groups: Mapping[tuple[str, str, str], list[Any]]) -> list[Cell]:
        cells = []
        for (method, dataset, metric), samples in groups.items():
            first = samples[0][2]
            headline = (
                metric in headline_paths if table == "transfer" else metric in MULTIMODALITY_METRICS
            )
            group = metric.rsplit("/", 1)[0]  # "knn/k200/top1" → "knn/k200"
            clipped = {
                run.knn_k_effective[group] for _, _, run in samples if group in run.knn_k_effective
            }
            episode_ci95, episodes = (
                _episode_interval(metric, samples) if table == "transfer" else (None, None)
            )
            protocol = metric.split("/", 1)[0]
            problems = tuple(
                (str(run.source), problem)
                for _, _, run in samples
                if table == "transfer"
                for problem in run.protocol_problems.get(protocol, ())
            )
            cell = Cell(
                table=table,
                method=method,
                dataset=dataset,
                labels=first.labels,
                metric=metric,
                values=tuple(v for v, _, _ in samples),
                seeds=tuple(s for _, s, _ in samples),
                headline=headline,
                k_effective=tuple(sorted(clipped)),
                episode_ci95=episode_ci95,
                episodes=episodes,
                problems=problems,
            )
            mixed = tuple(c for c in conflicts if c.concerns(cell))
            cells.append(dataclasses.replace(cell, mixed_settings=mixed) if mixed else cell)
        return cells

    transfer_cells = _mark_best(build("transfer", transfer))
    multimodal_cells = _mark_best(
        build("multimodality", multimodal),
        {metric: better for metric, (_, better) in MULTIMODALITY_METRICS.items()},
    )
    _warn_repeated_seeds(transfer)
    _warn_repeated_seeds(multimodal)
    _warn_mixed_settings(conflicts)
    return transfer_cells + multimodal_cells


def format_cell(cell: Cell, *, scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std (n seeds)`` (``mean (1 seed)`` for one) of the values × ``scale``, bold when
    best; ``(n seeds, k = 54)`` when a kNN column could only use 54 neighbours; ``(3 runs of 2
    seeds)`` when a seed was evaluated more than once (its runs are averaged first). A single run with
    an episode interval reads ``mean ± ci (95 % CI over 600 episodes, 1 seed)``: the ± is then
    not a spread over seeds, and the cell says so."""
    text = f"{cell.mean * scale:.{digits}f}"
    spread = ""
    if cell.std is not None:
        text += f" ± {cell.std * scale:.{digits}f}"
    elif cell.episode_ci95 is not None:
        text += f" ± {cell.episode_ci95 * scale:.{digits}f}"
        over = f"{cell.episodes} episodes" if cell.episodes is not None else "episodes"
        spread = f"95 % CI over {over}, "
    clipped = f", k = {'/'.join(str(k) for k in cell.k_effective)}" if cell.k_effective else ""
    counted = f"{cell.n} seed{'s' if cell.n != 1 else ''}"
    if cell.runs > cell.n:  # a seed evaluated more than once: its runs are averaged first
        counted = f"{cell.runs} runs of {counted}"
    text += f" ({spread}{counted}{clipped})"
    return f"**{text}**" if cell.best else text


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _markdown_table(
    cells: Sequence[Cell],
    methods: Sequence[str],
    columns: Sequence[tuple[str, str]],
    header: Mapping[tuple[str, str], str],
    *,
    percent: Mapping[str, bool] | None = None,
    digits: Mapping[str, int] | None = None,
    markers: Mapping[tuple[str, str], str] | None = None,
) -> list[str]:
    by_key = {(c.method, c.dataset, c.metric): c for c in cells}
    markers = markers or {}
    percent, digits = percent or {}, digits or {}
    lines = [
        "| method | " + " | ".join(_escape(header[column]) for column in columns) + " |",
        "|:--|" + "|".join("--:" for _ in columns) + "|",
    ]
    for method in methods:
        row = []
        for dataset, metric in columns:
            cell = by_key.get((method, dataset, metric))
            scale = 100.0 if percent.get(metric) else 1.0
            row.append(
                MISSING
                if cell is None
                else format_cell(cell, scale=scale, digits=digits.get(metric, 2))
                + _marker(cell, markers)
                + (" †" if cell.problems else "")
            )
        lines.append(f"| {_escape(method)} | " + " | ".join(row) + " |")
    return lines


def _conflict_key(conflict: SettingsConflict) -> tuple[str, str | None]:
    """A conflict's note in REPORT.md: its row (dataset, method), or its dataset for rows that
    differ from each other."""
    return conflict.dataset, conflict.methods[0] if conflict.within_row else None


def _marker(cell: Cell, numbers: Mapping[tuple[str, str | None], str]) -> str:
    """`` ⚠1`` (the notes of the Warnings section) for a cell whose runs mix settings."""
    found = dict.fromkeys(numbers[_conflict_key(c)] for c in cell.mixed_settings)
    return "".join(f" ⚠{number}" for number in found)


def _warnings_section(cells: Sequence[Cell]) -> tuple[list[str], dict[tuple[str, str | None], str]]:
    """The Warnings section of REPORT.md (one note per row or dataset whose runs differ in a
    setting) and the number of each note."""
    groups: dict[tuple[str, str | None], dict[str, SettingsConflict]] = {}
    for cell in cells:
        for conflict in cell.mixed_settings:
            groups.setdefault(_conflict_key(conflict), {})[conflict.setting] = conflict
    if not groups:
        return [], {}
    numbers = {key: str(index) for index, key in enumerate(groups, start=1)}
    lines = [
        "## Warnings",
        "",
        "Cells marked ⚠N mix runs with different settings (note N); read them with care.",
        "",
    ]
    for (dataset, method), found in groups.items():
        listed = "; ".join(c.describe(markdown=True) for c in found.values())
        if method is not None:
            what = (
                f"`{_escape(method)}` on {dataset} averages runs with different settings, so its "
                "mean ± std is not a spread over seeds of one setting"
            )
        else:
            what = (
                f"The rows of {dataset} were evaluated with different settings, so these cells, "
                "the bold best and the paired differences compare unlike evaluations"
            )
        lines.append(f"- **⚠{numbers[(dataset, method)]}** {what}: {_escape(listed)}.")
    lines.append("")
    return lines, numbers


def _problems_section(cells: Sequence[Cell]) -> list[str]:
    """REPORT.md's note on the cells marked † (a result ``look evaluate`` warned about), by
    file."""
    found: dict[str, dict[str, None]] = {}
    for cell in cells:
        for path, problem in cell.problems:
            found.setdefault(path, {})[problem] = None
    if not found:
        return []
    lines = [
        "## Evaluation warnings",
        "",
        "Cells marked † include a result that `look evaluate` warned about: a linear probe "
        "whose fit may be below what the features allow (raise `--linear-max-iter`, or widen "
        "`--linear-c-grid`), or few-shot figures from fewer episodes than the protocol asks.",
        "",
    ]
    lines += [f"- `{_escape(path)}`: {'; '.join(problems)}." for path, problems in found.items()]
    return [*lines, ""]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "figure"


def _transfer_section(
    cells: Sequence[Cell],
    methods: Sequence[str],
    datasets: Sequence[str],
    output_dir: Path,
    *,
    plots: bool,
    markers: Mapping[tuple[str, str | None], str] | None = None,
) -> tuple[list[str], list[Path]]:
    from look.analysis.maps import plot_metric_bars

    headline = [c for c in cells if c.table == "transfer" and c.headline]
    if not headline:
        return [], []
    columns = sorted(
        {(c.dataset, c.metric) for c in headline},
        key=lambda col: (datasets.index(col[0]), _metric_order(col[1])),
    )
    header = {(d, m): f"{d}<br>{metric_header(m)}" for d, m in columns}
    row_methods = [m for m in methods if any(c.method == m for c in headline)]
    note = "Top-1 accuracy (%) (few-shot: mean episode accuracy)."
    if any(c.metric.endswith("/mean_per_class_accuracy") for c in headline):
        note += (
            " A column marked *(mean/class)* gives mean per-class accuracy: that dataset's "
            "test classes are imbalanced (largest over smallest count above the linear probe's "
            "imbalance_ratio, 2 by default; results.json records it), where the protocol "
            "reports it instead of top-1."
        )
    if any(c.episode_ci95 is not None for c in headline):
        note += (
            " A few-shot cell of a single seed shows ± its 95 % confidence interval over the "
            "episodes, as the cell says; with several seeds ± is the std over seeds."
        )
    if any(c.k_effective for c in headline):
        note += (
            " *k = N* in a kNN cell: the training split has only N images, so only N "
            "neighbours voted."
        )
    lines = ["## Transfer accuracy", "", note, ""]
    lines += _markdown_table(headline, row_methods, columns, header, markers=markers)
    lines.append("")
    figures: list[Path] = []
    if plots:
        # One chart per dataset: a group of bars per protocol, a bar per method.
        for dataset in dict.fromkeys(d for d, _ in columns):
            dataset_cells = sorted(
                (c for c in headline if c.dataset == dataset), key=lambda c: _metric_order(c.metric)
            )
            rows = [{**c.as_row(), "protocol": metric_header(c.metric)} for c in dataset_cells]
            caption = _bars_caption(dataset_cells, row_methods)
            figure = plot_metric_bars(
                rows,
                None,
                output_dir / "figures" / f"bars_{_slug(dataset)}.png",
                group_by="protocol",
                ylabel="accuracy (%)",
                title=dataset,
                # One colour per method over all of the report's charts.
                colors={method: f"C{i % 10}" for i, method in enumerate(row_methods)},
                caption=caption,
            )
            figures.append(figure)
            lines.append(f"![{dataset}]({figure.relative_to(output_dir).as_posix()})")
            lines += ["", f"*{caption}*", ""]
        lines.append("")
    return lines, figures


def _bars_caption(cells: Sequence[Cell], methods: Sequence[str]) -> str:
    """What a dataset's bar chart shows: the bar, the whisker, and how many seeds each method
    has (a bar without a whisker is one seed, not one without spread)."""
    counts = []
    for method in methods:
        seeds = sorted({c.n for c in cells if c.method == method})
        if seeds:
            shown = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
            counts.append(f"{method} {shown}")
    return (
        "Bars: mean over seeds; whiskers: sample standard deviation over seeds; a bar without "
        f"one has a single seed. Seeds per method: {', '.join(counts)}."
    )


def _format_difference(
    comparison: PairedComparison,
    *,
    scale: float = 1.0,
    digits: int = 2,
    words: Mapping[str, str] | None = None,
) -> str:
    """``+0.15 [−1.02, +1.32] no clear difference (3 seeds)``, the verdict (renamed by ``words``)
    in bold when the interval excludes zero; ``+0.15 (1 seed)`` without an interval;
    ``-5.00 (the same on all 3 seeds), no clear difference`` for a constant difference."""
    text = comparison.difference_text(scale=scale, digits=digits)
    if comparison.interval is None:  # one shared seed: the difference, and no verdict
        return f"{text} (1 seed)"
    verdict = comparison.verdict
    if verdict in (BETTER, WORSE):
        verdict = f"**{(words or {}).get(verdict, verdict)}**"
    if comparison.same_on_every_seed:  # the text already says how many seeds
        return f"{text}, {verdict}"
    return f"{text} {verdict} ({comparison.n} seeds)"


def _comparison_section(
    comparisons: Sequence[PairedComparison],
    datasets: Sequence[str],
    *,
    multimodality: bool = False,
    cells: Sequence[Cell] = (),
    markers: Mapping[tuple[str, str | None], str] | None = None,
) -> list[str]:
    if not comparisons:
        return []
    table = "multimodality" if multimodality else "transfer"
    by_key = {(c.method, c.dataset, c.metric): c for c in cells if c.table == table}

    def marks(comparison: PairedComparison) -> str:
        """The notes of the two cells a difference comes from."""
        if not markers:
            return ""
        found = dict.fromkeys(
            mark
            for method in (comparison.method, comparison.baseline)
            if (cell := by_key.get((method, comparison.dataset, comparison.metric))) is not None
            for mark in _marker(cell, markers).split()
        )
        return "".join(f" {mark}" for mark in found)

    if multimodality:
        lines = [
            "## Paired differences in multi-modality",
            "",
            "The multi-modality measures, method − baseline seed by seed: mean difference [95 % "
            "confidence interval, Student's t]; purity and separability in points. *higher* / "
            "*lower* only when the interval excludes zero. Runs that repeat a seed are averaged "
            "first, so the seed count is the number of distinct seeds.",
            "",
        ]
    else:
        lines = [
            "## Paired differences with the baseline",
            "",
            "Method − baseline in accuracy points, seed by seed over the seeds both were run "
            "with: mean difference [95 % confidence interval, Student's t]. *better* / *worse* "
            "only when the interval excludes zero; one shared seed gives no interval. Runs that "
            "repeat a seed are averaged first, so the seed count is the number of distinct seeds.",
            "",
        ]
    for dataset in datasets:
        here = [c for c in comparisons if c.dataset == dataset]
        if not here:
            continue
        if multimodality:
            metrics = [m for m in MULTIMODALITY_METRICS if any(c.metric == m for c in here)]
            headers = [MULTIMODALITY_METRICS[m][0] for m in metrics]
        else:
            metrics = sorted({c.metric for c in here}, key=_metric_order)
            headers = [metric_header(m) for m in metrics]
        by_key = {(c.method, c.metric): c for c in here}
        lines += [
            f"### {dataset} — baseline: {here[0].baseline}",
            "",
            "| method | " + " | ".join(_escape(h) for h in headers) + " |",
            "|:--|" + "|".join("--:" for _ in metrics) + "|",
        ]

        def cell(comparison: PairedComparison) -> str:
            if not multimodality:
                return _format_difference(comparison) + marks(comparison)
            metric = comparison.metric
            return _format_difference(
                comparison,
                scale=100.0 if _MULTIMODALITY_PERCENT[metric] else 1.0,
                digits=_MULTIMODALITY_DIGITS[metric],
                words={BETTER: "higher", WORSE: "lower"},
            ) + marks(comparison)

        for method in dict.fromkeys(c.method for c in here):  # this dataset's own order
            row = [cell(by_key[(method, m)]) if (method, m) in by_key else MISSING for m in metrics]
            lines.append(f"| {_escape(method)} | " + " | ".join(row) + " |")
        lines.append("")
    return lines


def _multimodality_settings_lines(runs: Sequence[EvaluationResult]) -> list[str]:
    """One line per distinct analysis settings among the multi-modality rows, naming the rows."""
    from look.analysis.analyze import settings_line

    groups: dict[str, list[str]] = {}
    for run in runs:
        values = {
            key.removeprefix(MULTIMODALITY_SETTING): json.loads(value)
            for key, value in run.settings.items()
            if key.startswith(MULTIMODALITY_SETTING)
        }
        if not values or "k" not in values:
            continue  # written before settings were recorded, or not by look analyze
        text = settings_line(values)  # groupings differ by dataset: ⚠ marks tell within one
        row = f"{run.method} on {run.dataset_label}"
        if row not in groups.setdefault(text, []):
            groups[text].append(row)
    if not groups:
        return []
    if len(groups) == 1:
        return [f"Settings (`look analyze`): {next(iter(groups))}.", ""]
    lines = [
        "Settings (`look analyze`) differ between rows (compare only rows of one setting):",
        "",
    ]
    lines += [f"- {text}: {', '.join(_escape(r) for r in rows)}" for text, rows in groups.items()]
    return [*lines, ""]


def _multimodality_section(
    cells: Sequence[Cell],
    methods: Sequence[str],
    datasets: Sequence[str],
    *,
    markers: Mapping[tuple[str, str | None], str] | None = None,
    runs: Sequence[EvaluationResult] = (),
) -> list[str]:
    multimodal = [c for c in cells if c.table == "multimodality"]
    headline = [c for c in multimodal if c.headline]
    if not headline:
        return []
    order = list(MULTIMODALITY_METRICS)
    columns = sorted(
        {(c.dataset, c.metric) for c in headline},
        key=lambda col: (datasets.index(col[0]), order.index(col[1])),
    )
    whole_set = {c.dataset for c in multimodal if c.labels == WHOLE_SET_LABELS}
    several_datasets = len({d for d, _ in columns}) > 1 or bool(whole_set)

    def title(dataset: str, metric: str) -> str:
        name = MULTIMODALITY_METRICS[metric][0]
        if dataset in whole_set:  # one group: never "per coarse class"
            name = name.replace("clusters per coarse class", "clusters in the whole set")
        return (f"{dataset}<br>" if several_datasets else "") + name

    header = {(d, m): title(d, m) for d, m in columns}
    row_methods = [m for m in methods if any(c.method == m for c in headline)]
    lines = [
        "## Intra-class multi-modality",
        "",
        "Inside each coarse class, on frozen features (averaged over the coarse classes with "
        "several fine classes): kNN purity and linear separability of the *fine* labels, the "
        "number of clusters found (KMeans + silhouette) and the agreement of clusters with the "
        "fine labels (adjusted Rand index, chance level 0): *ARI at fine count* clusters with "
        "KMeans at the number of fine classes and is the one to compare; *ARI chosen clusters* "
        "scores the silhouette's choice, 0 whenever it chose 1 cluster. Higher "
        "purity/separability/ARI = more fine structure kept; definitions in "
        "`look.analysis.multimodality`.",
        "",
    ]
    if whole_set:
        listed = ", ".join(sorted(whole_set))
        lines += [
            f"**No coarse grouping** in {listed}: these columns measure the whole set as one "
            "group (every fine class together), not fine classes inside coarse classes.",
            "",
        ]
    lines += _multimodality_settings_lines(runs)
    lines += _markdown_table(
        headline,
        row_methods,
        columns,
        header,
        percent=_MULTIMODALITY_PERCENT,
        digits=_MULTIMODALITY_DIGITS,
        markers=markers,
    )
    # Chance levels row by row: they depend on each row's class balance and subsample, so one
    # average over rows (of possibly different settings) would describe none of them.
    chance = [c for c in multimodal if c.metric in _CHANCE_HEADERS]
    chance_columns = sorted(
        {(c.dataset, c.metric) for c in chance},
        key=lambda col: (datasets.index(col[0]), list(_CHANCE_HEADERS).index(col[1])),
    )
    if chance_columns:
        chance_header = {
            (d, m): (f"{d}<br>" if several_datasets else "") + _CHANCE_HEADERS[m]
            for d, m in chance_columns
        }
        lines += [
            "",
            "Chance levels of each row (labels independent of the features; the chance level of "
            "either ARI is 0):",
            "",
        ]
        lines += _markdown_table(
            chance,
            [m for m in row_methods if any(c.method == m for c in chance)],
            chance_columns,
            chance_header,
            percent=_MULTIMODALITY_PERCENT,
            digits=_MULTIMODALITY_DIGITS,
            markers=markers,
        )
    else:
        lines += ["", "Chance level of either ARI: 0."]
    lines.append("")
    return lines


def _remove_stale_figures(output_dir: Path, written: Sequence[Path]) -> None:
    """Remove the figures an earlier report wrote here that this one did not (other inputs,
    ``--no-plots``): only files named as this command names its figures, so others stay."""
    kept = {path.resolve() for path in written}
    for pattern in ("bars_*.png", "map_*.png"):
        for figure in (output_dir / "figures").glob(pattern):
            if figure.resolve() not in kept:
                figure.unlink(missing_ok=True)


def _copy_maps(map_figures: Sequence[Path], output_dir: Path) -> tuple[list[str], list[Path]]:
    if not map_figures:
        return [], []
    lines = ["## Maps", ""]
    copied = []
    (output_dir / "figures").mkdir(parents=True, exist_ok=True)
    for index, source in enumerate(map_figures):
        destination = output_dir / "figures" / f"map_{index}_{source.name}"
        shutil.copyfile(source, destination)
        copied.append(destination)
        lines.append(f"![{source.stem}]({destination.relative_to(output_dir).as_posix()})")
    lines.append("")
    return lines, copied


_CSV_FIELDS = (
    "table",
    "method",
    "dataset",
    "labels",
    "metric",
    "mean",
    "std",
    "n",
    "runs",
    "seeds",
    "values",
    "headline",
    "best",
    "k_effective",
    "episode_ci95",
    "episodes",
    "mixed_settings",
    "problems",
)


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with atomic_write_path(path) as temp, temp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            # repr() round-trips floats exactly, so the CSV holds the JSON's numbers.
            writer.writerow(
                {
                    **row,
                    "mean": repr(row["mean"]),
                    "std": "" if row["std"] is None else repr(row["std"]),
                    "labels": row["labels"] or "",
                    "seeds": ";".join("" if s is None else str(s) for s in row["seeds"]),
                    "values": ";".join(repr(v) for v in row["values"]),
                    "k_effective": ";".join(str(k) for k in row["k_effective"]),
                    "episode_ci95": ""
                    if row["episode_ci95"] is None
                    else repr(row["episode_ci95"]),
                    "episodes": "" if row["episodes"] is None else row["episodes"],
                    "mixed_settings": ";".join(row["mixed_settings"]),
                    "problems": ";".join(row["problems"]),
                }
            )


def write_report(
    result_files_or_dirs: Sequence[str | Path],
    output_dir: str | Path,
    *,
    title: str = DEFAULT_TITLE,
    plots: bool = True,
    baseline: Sequence[str] = (),
) -> ReportOutputs:
    """Collect results (see the module docstring) into ``output_dir``.

    Writes REPORT.md, report.json (``{"title", "inputs", "methods", "datasets", "cells",
    "figures"}``, a cell per method × dataset × metric as in :meth:`Cell.as_row`), report.csv (the
    same cells, one per line) and ``figures/`` (a bar chart per dataset unless ``plots`` is False,
    and the maps of any ``multimodality.json`` input). With ``baseline`` (row labels, the first
    present on a dataset is its baseline; see :func:`look.analysis.compare.compare_with_baseline`)
    REPORT.md gets the paired differences with it (transfer accuracies, and the multi-modality
    measures where there are any) and report.json a ``"comparisons"`` list (``"table"`` says which).
    Returns the paths written and the cells.
    ``FileNotFoundError`` when no input is found, ``ValueError`` when the inputs hold no number.
    """
    output_dir = Path(output_dir)
    result_paths, multimodality_paths = find_report_inputs(result_files_or_dirs)
    runs = [read_results_file(path) for path in result_paths]
    map_figures: list[Path] = []
    for path in multimodality_paths:
        rows, figures = read_multimodality_file(path)
        runs.extend(rows)
        map_figures.extend(figures)
    if not any(run.metrics or run.multimodality for run in runs):
        raise ValueError(
            f"the inputs ({len(result_paths)} results files, {len(multimodality_paths)} "
            "multimodality files) hold no accuracy under 'protocols' and no 'multimodality' "
            "numbers; see look.analysis.results for the keys that are read"
        )
    cells = aggregate_cells(runs)
    # The unpaired-seeds warnings go to REPORT.md too, not to the terminal alone.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        comparisons = compare_with_baseline(cells, baseline) if baseline else []
        multimodal_comparisons = (
            compare_with_baseline(cells, baseline, table="multimodality") if baseline else []
        )
    for found in caught:
        warnings.warn_explicit(found.message, found.category, found.filename, found.lineno)
    unpaired = [str(w.message) for w in caught if issubclass(w.category, UnpairedSeedsWarning)]
    output_dir.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(c.method for c in cells))
    datasets = list(dict.fromkeys(c.dataset for c in cells))
    inputs = [*result_paths, *multimodality_paths]

    lines = [
        f"# {title}",
        "",
        f"Collected by `look report` from {len(result_paths)} results file(s) and "
        f"{len(multimodality_paths)} multi-modality file(s). A cell is the mean ± sample standard "
        "deviation over seeds (number of seeds in brackets, and of runs where a seed was "
        "evaluated more than once: its runs are averaged first; a single-seed few-shot cell says "
        "when its ± is the confidence interval over episodes instead); the best mean of a column "
        f"is in bold; {MISSING} means not evaluated. The same numbers, and every secondary metric, "
        "are in [report.json](report.json) and [report.csv](report.csv).",
        "",
    ]
    warning_lines, markers = _warnings_section(cells)
    lines += warning_lines + _problems_section(cells)
    transfer_lines, written_figures = _transfer_section(
        cells, methods, datasets, output_dir, plots=plots, markers=markers
    )
    lines += transfer_lines
    lines += _comparison_section(comparisons, datasets, cells=cells, markers=markers)
    if unpaired:
        lines += ["Seeds that could not be paired:", ""]
        lines += [f"- {_escape(note)}." for note in unpaired] + [""]
    lines += _multimodality_section(
        cells,
        methods,
        datasets,
        markers=markers,
        runs=[run for run in runs if run.multimodality],
    )
    lines += _comparison_section(
        multimodal_comparisons, datasets, multimodality=True, cells=cells, markers=markers
    )
    map_lines, copied_maps = _copy_maps(map_figures, output_dir)
    lines += map_lines
    written_figures += copied_maps
    lines += ["## Inputs", "", *[f"- `{path}`" for path in inputs], ""]

    markdown_path = output_dir / "REPORT.md"
    atomic_write_text(markdown_path, "\n".join(lines))
    rows = [cell.as_row() for cell in cells]
    json_path = output_dir / "report.json"
    report = {
        "title": title,
        "inputs": [str(p) for p in inputs],
        "methods": methods,
        "datasets": datasets,
        "cells": rows,
        "settings_conflicts": [
            conflict.as_row()
            for conflict in dict.fromkeys(c for cell in cells for c in cell.mixed_settings)
        ],
        "comparisons": [
            {"table": table, **comparison.as_row()}
            for table, group in (
                ("transfer", comparisons),
                ("multimodality", multimodal_comparisons),
            )
            for comparison in group
        ],
        "figures": [p.relative_to(output_dir).as_posix() for p in written_figures],
    }
    atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    csv_path = output_dir / "report.csv"
    _write_csv(csv_path, rows)
    _remove_stale_figures(output_dir, written_figures)
    return ReportOutputs(
        markdown=markdown_path,
        json=json_path,
        csv=csv_path,
        figures=tuple(written_figures),
        cells=tuple(cells),
    )
