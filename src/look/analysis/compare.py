"""Paired comparison of each method with a baseline, seed by seed, with a 95 % confidence interval.

Two methods trained with the same seed share their data order, initialisation and augmentations,
so the seed-to-seed spread they have in common cancels in the difference. For every headline
metric of a dataset, the differences ``d_s = method_s − baseline_s`` over the seeds both have give
``mean(d) ± t(0.975, n − 1) · sd(d) / √n`` (Student's t). The verdict says *better* or *worse*
only when that interval excludes zero; with one shared seed there is no interval, and the
verdict says so rather than calling a difference of one run a win. When every seed gives the
same difference (a count, such as a number of clusters, often does) the t interval shrinks to
that one value and would call any such difference certain; the verdict then comes from the exact
sign test instead (all n seeds on one side has probability 2 · 0.5^n without a real difference:
below 5 % from 6 seeds on).

A seed is one pair however many runs give it: when a side has several values for one seed (two
evaluations under one row label, which ``look report`` also warns about), they are averaged per
seed first, so ``n`` is the number of distinct shared seeds — a repeated seed neither counts as an
extra independent pair nor loses all but one of its values.
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from scipy import stats

__all__ = [
    "BETTER",
    "NO_INTERVAL",
    "TIE",
    "WORSE",
    "PairedComparison",
    "UnpairedSeedsWarning",
    "compare_with_baseline",
]


class UnpairedSeedsWarning(UserWarning):
    """A method and its baseline do not share all their seeds: the comparison uses the shared
    ones only, or is left out when there are none."""


BETTER = "better"
WORSE = "worse"
TIE = "no clear difference"
NO_INTERVAL = "one seed: no interval"
CONFIDENCE = 0.95


def _same(a: float, b: float) -> bool:
    """Equal up to the rounding of accuracies computed as ``100 * correct / total``."""
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """``method − baseline`` on one metric of one dataset, over the seeds both were run with."""

    dataset: str
    metric: str
    method: str
    baseline: str
    seeds: tuple[int, ...]
    differences: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float:
        return math.fsum(self.differences) / self.n

    @property
    def interval(self) -> tuple[float, float] | None:
        """The 95 % confidence interval of the mean difference; ``None`` for one seed."""
        if self.n < 2:
            return None
        half = stats.t.ppf(0.5 + CONFIDENCE / 2, self.n - 1) * statistics.stdev(self.differences)
        half /= math.sqrt(self.n)
        return self.mean - half, self.mean + half

    @property
    def same_on_every_seed(self) -> bool:
        """Whether two or more seeds all give one difference (the t interval is then a point).
        Up to float rounding: one image more of 1,000 on every seed gives differences of
        0.10000000000000142 and 0.09999999999999432, whose tiny spread would make a point
        interval declare a win that the sign test of a constant difference does not."""
        first = self.differences[0] if self.differences else 0.0
        return self.n >= 2 and all(_same(difference, first) for difference in self.differences)

    @property
    def verdict(self) -> str:
        interval = self.interval
        if interval is None:
            return NO_INTERVAL
        if self.same_on_every_seed:
            difference = self.differences[0]
            if _same(difference, 0.0) or 2 * 0.5**self.n >= 1 - CONFIDENCE:  # exact sign test
                return TIE
            return BETTER if difference > 0 else WORSE
        if interval[0] > 0:
            return BETTER
        if interval[1] < 0:
            return WORSE
        return TIE

    def difference_text(self, *, scale: float = 1.0, digits: int = 2) -> str:
        """``+0.15 [−1.02, +1.32]`` (the mean difference and its interval, × ``scale``),
        ``+0.15`` alone for one seed, ``+1.00 (the same on all 3 seeds)`` for a constant one."""
        text = f"{self.mean * scale:+.{digits}f}"
        if self.same_on_every_seed:
            return f"{text} (the same on all {self.n} seeds)"
        interval = self.interval
        if interval is not None:
            text += f" [{interval[0] * scale:+.{digits}f}, {interval[1] * scale:+.{digits}f}]"
        return text

    def as_row(self) -> dict[str, Any]:
        interval = None if self.same_on_every_seed else self.interval
        return {
            "dataset": self.dataset,
            "metric": self.metric,
            "method": self.method,
            "baseline": self.baseline,
            "n": self.n,
            "seeds": list(self.seeds),
            "mean_difference": self.mean,
            "ci95_low": None if interval is None else interval[0],
            "ci95_high": None if interval is None else interval[1],
            "same_on_every_seed": self.same_on_every_seed,
            "verdict": self.verdict,
        }


def mean_per_seed(seeds: Sequence[int | None], values: Sequence[float]) -> dict[int, float]:
    """One value per recorded seed: the mean of the runs that share it (a repeated seed is one
    sample of the seed-to-seed spread, not several)."""
    by_seed: dict[int, list[float]] = {}
    for seed, value in zip(seeds, values, strict=True):
        if seed is not None:
            by_seed.setdefault(seed, []).append(value)
    return {seed: math.fsum(found) / len(found) for seed, found in by_seed.items()}


_BACKBONE_IN_LABEL = re.compile(r" \[[^\]]+\]")


def _matching(label: str, present: Iterable[str]) -> str | None:
    """The row ``label`` names among ``present``: itself, or else the one row that is ``label``
    once its backbone (`` [resnet18]``) is left out, so that ``"ce (coarse)"`` finds
    ``"ce [resnet18] (coarse)"`` when a report holds one backbone; None if none or several."""
    present = list(present)
    if label in present:
        return label
    found = [row for row in present if _BACKBONE_IN_LABEL.sub("", row, count=1) == label]
    return found[0] if len(found) == 1 else None


def compare_with_baseline(
    cells: Sequence[Any], baselines: Sequence[str], *, table: str = "transfer"
) -> list[PairedComparison]:
    """Every headline metric of ``table`` (``"transfer"`` or ``"multimodality"``) of every method
    against the baseline of its dataset.

    ``cells`` are :class:`look.analysis.report.Cell` objects. A dataset's baseline is the first
    label of ``baselines`` with a row on that dataset (``["ce (coarse)", "ce (fine)"]`` picks the
    coarse-label CE where there is one); datasets without any are left out. Each side's values
    are averaged per seed, then only seeds present in both cells are paired (runs without a
    recorded seed cannot be), so ``n`` counts distinct seeds. ``ValueError`` when no label of
    ``baselines`` names a transfer row at all, listing the rows there are.
    """
    transfer = [c for c in cells if c.table == table and c.headline]
    labels = list(dict.fromkeys(c.method for c in transfer))
    if table == "transfer" and not any(_matching(label, labels) for label in baselines):
        raise ValueError(f"baseline {list(baselines)} names no row of the report; rows: {labels}")
    comparisons = []
    # (dataset, method, baseline) → {(its seeds, the baseline's): metrics}: the seeds may differ
    # by metric (a protocol missing from one seed's results).
    unpaired: dict[tuple[str, str, str], dict[tuple[tuple[int, ...], tuple[int, ...]], list[str]]]
    unpaired = {}
    for dataset in dict.fromkeys(c.dataset for c in transfer):
        here = [c for c in transfer if c.dataset == dataset]
        present = {c.method for c in here}
        baseline = next(
            (found for label in baselines if (found := _matching(label, present))), None
        )
        if baseline is None:
            continue
        reference = {c.metric: c for c in here if c.method == baseline}
        for cell in here:
            base = reference.get(cell.metric)
            if cell.method == baseline or base is None:
                continue
            theirs = mean_per_seed(base.seeds, base.values)
            mine = mean_per_seed(cell.seeds, cell.values)
            pairs = sorted((s, v - theirs[s]) for s, v in mine.items() if s in theirs)
            if set(mine) != set(theirs):
                seed_sets = (tuple(sorted(mine)), tuple(sorted(theirs)))
                by_seeds = unpaired.setdefault((str(dataset), cell.method, baseline), {})
                by_seeds.setdefault(seed_sets, []).append(cell.metric)
            if pairs:
                seeds, differences = zip(*pairs, strict=True)
                comparisons.append(
                    PairedComparison(
                        dataset, cell.metric, cell.method, baseline, seeds, differences
                    )
                )
    for (dataset, method, baseline), by_seeds in unpaired.items():
        for (mine_seeds, base_seeds), metrics in by_seeds.items():
            shared = sorted(set(mine_seeds) & set(base_seeds))
            outcome = (
                f"compared on seeds {shared} only" if shared else "no paired comparison is possible"
            )
            warnings.warn(
                UnpairedSeedsWarning(
                    f"{method!r} on {dataset} ({', '.join(metrics)}) has seeds "
                    f"{list(mine_seeds)}, its baseline {baseline!r} {list(base_seeds)}: "
                    f"{outcome} (runs without a recorded seed cannot be paired)"
                ),
                stacklevel=2,
            )
    return comparisons
