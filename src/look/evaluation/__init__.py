"""Transfer evaluation: linear probe, weighted kNN, fine-tuning and few-shot episodes.

Entry point: :func:`evaluate` (``look evaluate`` on the command line, see
:mod:`look.evaluation.commands`). Frozen features are extracted once per model, dataset, split
and transform, cached on disk, and gathered in dataset order across ranks.
"""

from look.evaluation.features import (
    DEFAULT_FEATURE_CACHE_DIR,
    FeatureSet,
    data_files_fingerprint,
    extract_features,
    feature_cache_key,
    gather_shards,
    keep_readable,
    load_or_extract_features,
    unreadable_indices,
)
from look.evaluation.fewshot import (
    FEWSHOT_CLASSIFIER,
    FewShotEpisodesWarning,
    FewShotOptions,
    confidence_interval_95,
    fewshot_episode_accuracies,
    fewshot_evaluate,
)
from look.evaluation.finetune import FinetuneOptions, default_finetune_recipe, finetune
from look.evaluation.knn import KnnOptions, knn_classify, knn_predict
from look.evaluation.linear_probe import (
    DEFAULT_C_GRID,
    LinearProbeConvergenceWarning,
    LinearProbeGridWarning,
    LinearProbeOptions,
    LogisticRegressionFit,
    fit_logistic_regression,
    linear_probe,
    predict_logistic_regression,
    standardize,
    stratified_validation_split,
)
from look.evaluation.metrics import mean_per_class_accuracy, per_class_accuracy, top1_accuracy
from look.evaluation.model_source import (
    FeatureModel,
    LoadedModel,
    ModelSource,
    load_model,
    state_fingerprint,
)
from look.evaluation.suite import (
    DATASET_SPEC_HELP,
    PROTOCOLS,
    RESULTS_FILE,
    evaluate,
    parse_dataset_spec,
    resolve_eval_device,
    resolve_protocols,
)

__all__ = [
    "DATASET_SPEC_HELP",
    "DEFAULT_C_GRID",
    "DEFAULT_FEATURE_CACHE_DIR",
    "FEWSHOT_CLASSIFIER",
    "PROTOCOLS",
    "RESULTS_FILE",
    "FeatureModel",
    "FeatureSet",
    "FewShotEpisodesWarning",
    "FewShotOptions",
    "FinetuneOptions",
    "KnnOptions",
    "LinearProbeConvergenceWarning",
    "LinearProbeGridWarning",
    "LinearProbeOptions",
    "LoadedModel",
    "LogisticRegressionFit",
    "ModelSource",
    "confidence_interval_95",
    "data_files_fingerprint",
    "default_finetune_recipe",
    "evaluate",
    "extract_features",
    "feature_cache_key",
    "fewshot_episode_accuracies",
    "fewshot_evaluate",
    "finetune",
    "fit_logistic_regression",
    "gather_shards",
    "keep_readable",
    "knn_classify",
    "knn_predict",
    "linear_probe",
    "load_model",
    "load_or_extract_features",
    "mean_per_class_accuracy",
    "parse_dataset_spec",
    "per_class_accuracy",
    "predict_logistic_regression",
    "resolve_eval_device",
    "resolve_protocols",
    "standardize",
    "state_fingerprint",
    "stratified_validation_split",
    "top1_accuracy",
    "unreadable_indices",
]
