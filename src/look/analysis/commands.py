"""The ``look analyze`` and ``look report`` subcommands: argument parsing over :mod:`look.analysis`.

``look.cli`` wires them with :func:`register` (adds both subparsers) and dispatches to
:func:`run_analyze` / :func:`run_report`, which return the process exit code.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from look.analysis.features import FEATURE_FILE_SUFFIX
from look.analysis.maps import DEFAULT_PERPLEXITY
from look.analysis.multimodality import (
    DEFAULT_K,
    DEFAULT_MAX_CLUSTERS,
    DEFAULT_MAX_PER_COARSE,
)

__all__ = ["register", "run_analyze", "run_report"]

_ANALYZE_DESCRIPTION = f"""\
Measure intra-class multi-modality of frozen features and draw Figure-1 style t-SNE maps.

For every feature set, inside each coarse class: fine-label kNN purity (cosine, leave-one-out,
neighbours from the same coarse class), cross-validated linear separability of the fine classes
(logistic regression on standardised features, stratified 3-fold) with chance levels, the number of
clusters (KMeans + silhouette over k = 1..--max-clusters) and its adjusted Rand index against the
fine labels. Large coarse classes are subsampled (--max-per-coarse, seeded).

Input: feature files, i.e. .pt files saved with torch.save of
  {{"features": FloatTensor N x D, "labels": LongTensor N (fine), "coarse_labels": LongTensor N or
   None, "fine_names": [...], "coarse_names": [...], "name": str,
   optional "model": {{"method", "seed", ...}}, optional "dataset": str}}
(look.analysis.features.save_feature_set writes them; a feature cache file of `look evaluate`
loads too). --results DIR searches DIR recursively for *{FEATURE_FILE_SUFFIX} files and for the
results.json of `look evaluate`, whose recorded test-split feature cache is then analysed (class
names, method and seed from the results; the dataset's shipped coarse grouping when it has one).
Without coarse labels, pass --grouping: a feature set without them is measured over the whole set
as one group (a warning, and ANALYSIS.md says so). Of several results.json sharing one feature cache
(a model evaluated with --labels fine and --labels coarse) the fine-label one is used. A recorded
cache path is looked up as recorded, then relative to the results.json's folder; --cache-dir DIR
looks the cache files up by name in DIR first (a cache moved or made elsewhere).

Output (--output DIR): multimodality.json (read by `look report`; its "settings" record k, the
subsample, folds, silhouette threshold, seed, and the maps' points, perplexity and coarse classes),
maps.png (one panel per feature set; maps_<dataset>.png per dataset when several; maps of an
earlier run in DIR are removed) and ANALYSIS.md. The metrics are written before the maps are drawn:
a map that fails keeps them (re-run with --no-maps to skip the maps).

example:
  look analyze --features runs/look/fmnist.features.pt runs/ce/fmnist.features.pt \\
      --output analysis/ --coarse-classes Tops Footwear
"""

_REPORT_DESCRIPTION = """\
Collect evaluation results over methods and seeds into one report.

Inputs are results.json files written by `look evaluate`, multimodality.json files written by
`look analyze`, or folders searched recursively for both. Runs are grouped by method label
(model.method, plus [backbone] and (pretrain labels) when recorded) across seeds, and by dataset
(an image folder is named after its root: imagefolder:pets); each cell is mean ± sample std
(n seeds), the best mean of a column in bold, — where a protocol was not run, and "k = N" in a
kNN cell whose training split allowed only N neighbours; a one-seed few-shot cell shows its 95%
CI over episodes and says so. Two inputs with the same row, dataset and seed are named in a
warning and averaged into one seed (the cell says "3 runs of 2 seeds"). Runs of one row that differ in a setting (pre-training
data, labels or grouping file, size or length; evaluation image size, grouping, protocol
settings; never the seed or paths), and rows of one dataset evaluated differently, are named in a
warning with the values and files, and their cells are marked in REPORT.md (a Warnings section).
With --baseline, runs that repeat a seed are averaged per seed before pairing.

Output (--output DIR): REPORT.md (Markdown tables: methods x dataset/protocol, and a
multi-modality table when present; bar charts and maps embedded by relative links), report.json and
report.csv (the same numbers plus every secondary metric), figures/*.png.

example:
  look report runs/ analysis/ --output report/ --title "LOOK on Fashion-MNIST"
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``analyze`` and ``report`` subcommands to ``subparsers``."""
    analyze = subparsers.add_parser(
        "analyze",
        help="multi-modality metrics and t-SNE maps of frozen features",
        description=_ANALYZE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = analyze.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--features",
        nargs="+",
        metavar="FILE",
        help="feature files (.pt) or results.json files; one map panel and metrics row each",
    )
    source.add_argument(
        "--results",
        nargs="+",
        metavar="DIR",
        help=f"folders searched recursively for *{FEATURE_FILE_SUFFIX} feature files and "
        "results.json files (their recorded feature caches)",
    )
    analyze.add_argument("--output", required=True, metavar="DIR", help="output folder (created)")
    analyze.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="folder holding the feature cache files that results.json files record, looked up "
        "by file name (a cache moved, or recorded relative to another folder)",
    )
    analyze.add_argument(
        "--grouping",
        metavar="NAME_OR_JSON",
        help="class grouping giving the coarse labels from the fine class names (a shipped "
        "grouping such as fashion_mnist_coarse, or a JSON file); replaces the files' coarse labels",
    )
    analyze.add_argument(
        "--coarse-classes",
        nargs="+",
        metavar="CLASS",
        help="coarse classes drawn in the maps, by name or index (default: all when at most 6, "
        "else the first 4 with several fine classes); metrics always cover every coarse class",
    )
    analyze.add_argument(
        "--k", type=int, default=DEFAULT_K, help=f"neighbours for kNN purity (default {DEFAULT_K})"
    )
    analyze.add_argument(
        "--max-per-coarse",
        type=int,
        default=DEFAULT_MAX_PER_COARSE,
        help=f"rows per coarse class for the metrics, subsampled with --seed (default "
        f"{DEFAULT_MAX_PER_COARSE}; 0 = all)",
    )
    analyze.add_argument(
        "--max-clusters",
        type=int,
        default=DEFAULT_MAX_CLUSTERS,
        help=f"largest cluster count tried (default {DEFAULT_MAX_CLUSTERS})",
    )
    analyze.add_argument(
        "--max-points",
        type=int,
        default=2000,
        help="points per map panel, subsampled with --seed (default 2000, at least 4; 0 = all, "
        "slow)",
    )
    analyze.add_argument(
        "--perplexity",
        type=float,
        default=DEFAULT_PERPLEXITY,
        help=f"t-SNE perplexity of the maps (default {DEFAULT_PERPLEXITY:g}; lowered for small "
        "panels)",
    )
    analyze.add_argument("--no-maps", action="store_true", help="skip the t-SNE maps")
    analyze.add_argument(
        "--seed", type=int, default=0, help="seed of subsampling, folds, KMeans, t-SNE (default 0)"
    )
    analyze.add_argument(
        "--title", default="Intra-class multi-modality", help="title of ANALYSIS.md"
    )

    report = subparsers.add_parser(
        "report",
        help="collect results over methods and seeds into REPORT.md/json/csv",
        description=_REPORT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument(
        "paths",
        nargs="+",
        metavar="RUN_OR_RESULT_PATH",
        help="results.json / multimodality.json files, or folders searched recursively for them",
    )
    report.add_argument("--output", required=True, metavar="DIR", help="output folder (created)")
    report.add_argument("--title", default="LOOK transfer evaluation", help="report title")
    report.add_argument("--no-plots", action="store_true", help="skip the bar charts")
    report.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="ROW_LABEL",
        help="compare every method with this row (e.g. 'ce [resnet18] (coarse)', or 'ce "
        "(coarse)' when one backbone has such a row), seed by seed: mean difference with a 95%% "
        "confidence interval; repeatable, the first label present on a dataset is its baseline",
    )


def _non_negative(value: int, flag: str) -> int | None:
    if value < 0:
        raise ValueError(f"{flag} must be >= 0 (0 = no limit), got {value}")
    return value or None


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``look analyze``; returns the exit code."""
    from look.analysis.analyze import analyze_feature_sets
    from look.analysis.features import collect_feature_sets

    # Flags are checked before any feature file is read or metric computed.
    max_per_coarse = _non_negative(args.max_per_coarse, "--max-per-coarse")
    max_points = _non_negative(args.max_points, "--max-points")
    if not args.no_maps and max_points is not None and max_points < 4:
        raise ValueError(
            f"--max-points must be at least 4 (t-SNE needs 4 points per panel), or 0 for all; "
            f"got {args.max_points}"
        )
    if args.perplexity <= 0:
        raise ValueError(f"--perplexity must be > 0, got {args.perplexity}")
    if args.k < 1:
        raise ValueError(f"--k must be at least 1, got {args.k}")
    if args.max_clusters < 2:
        raise ValueError(
            f"--max-clusters must be at least 2 (the count is chosen among 2..N by silhouette, "
            f"else 1), got {args.max_clusters}"
        )
    pairs = collect_feature_sets(
        args.features if args.features else args.results, cache_dir=args.cache_dir
    )
    paths = [path for path, _ in pairs]
    feature_sets = [feature_set for _, feature_set in pairs]
    if args.grouping:
        feature_sets = [fs.with_grouping(args.grouping) for fs in feature_sets]
    outputs = analyze_feature_sets(
        feature_sets,
        Path(args.output),
        sources=paths,
        coarse_classes=args.coarse_classes,
        k=args.k,
        max_per_coarse=max_per_coarse,
        max_clusters=args.max_clusters,
        seed=args.seed,
        maps=not args.no_maps,
        max_points=max_points,
        perplexity=args.perplexity,
        title=args.title,
    )
    written = [outputs.markdown, outputs.multimodality_json, *outputs.figures]
    print(
        f"look: analysed {len(feature_sets)} feature set(s); wrote "
        f"{', '.join(str(p) for p in written)}"
    )
    return 0


def run_report(args: argparse.Namespace) -> int:
    """Run ``look report``; returns the exit code."""
    from look.analysis.report import write_report
    from look.analysis.results import ReportInputWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReportInputWarning)
        outputs = write_report(
            args.paths,
            Path(args.output),
            title=args.title,
            plots=not args.no_plots,
            baseline=args.baseline,
        )
    for warning in caught:
        if issubclass(warning.category, ReportInputWarning):
            # A message about the inputs, for the user: no Python source line.
            print(f"look: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    print(f"look: wrote {outputs.markdown}, {outputs.json.name}, {outputs.csv.name}")
    return 0
