"""Analysis of pre-trained features and evaluation results: multi-modality metrics, maps, reports.

- :mod:`look.analysis.features` — the feature-file format (``*.features.pt``) that ``look analyze``
  reads; the only bridge from evaluation to analysis.
- :mod:`look.analysis.multimodality` — fine-label kNN purity, linear separability and cluster count
  inside each coarse class.
- :mod:`look.analysis.maps` — Figure-1 style t-SNE maps and bar charts (matplotlib, Agg canvas).
- :mod:`look.analysis.analyze` — ``look analyze``: metrics + maps of several feature sets to a folder.
- :mod:`look.analysis.report` — ``look report``: results.json files over methods and seeds to
  REPORT.md, report.json and report.csv.
- :mod:`look.analysis.commands` — the argparse subcommands (``register``, ``run_analyze``,
  ``run_report``).
"""

from __future__ import annotations

from look.analysis.analyze import analyze_feature_sets
from look.analysis.features import FeatureSet, load_feature_set, save_feature_set
from look.analysis.maps import plot_embedding_maps, plot_metric_bars
from look.analysis.multimodality import multimodality_metrics
from look.analysis.report import write_report

__all__ = [
    "FeatureSet",
    "analyze_feature_sets",
    "load_feature_set",
    "multimodality_metrics",
    "plot_embedding_maps",
    "plot_metric_bars",
    "save_feature_set",
    "write_report",
]
