"""Reading ``results.json`` (one model evaluated on one dataset) into one normalised record.

Two shapes are read, and any mix of them, tolerantly (unknown keys are ignored, any protocol may be
missing, non-numeric values are skipped):

1. The evaluation's own format (``"format": "look-evaluation/1"``, written by ``look evaluate``)::

       {"units": "accuracies in percent",
        "model": {"backbone": str, "method": str | null, "source": ..., "path": ...,
                  "pretraining": {"dataset", "labels", "method", "seed", ...} | null, ...},
        "dataset": {"name": str, "class_names": [...], ...},
        "labels": {"evaluation": str, "pretraining": str | null, ...},
        "seed": int,
        "protocols": {"linear":   {"top1", "mean_per_class_accuracy", "best_c", ...},
                      "knn":      {"results": [{"k": 20, "top1", ...}, ...], ...},
                      "fewshot":  {"settings": [{"n_way": 5, "k_shot": 1, "mean_accuracy",
                                                 "ci95", ...}], ...},
                      "finetune": {"top1", "mean_per_class_accuracy", ...}},
        "features": {"test": {"cache_path": str | null, ...}, ...}}

2. The compact shape::

       {"model": {"name": str, "method": str | null, "seed": int | null,
                  "pretrain_labels": str | null, "backbone": str (optional),
                  "label": str (optional, overrides the row label)},
        "dataset": str, "labels": str,
        "protocols": {"linear": {"top1", "mean_per_class"}, "knn": {"k20": {"top1"}, ...},
                      "fewshot": {"5way1shot": {"mean", "ci95"}, ...}, "finetune": {"top1"}},
        "multimodality": {"summary": {"knn_purity": float, ...}}}     # optional

**Metrics** are the accuracy-valued keys (:data:`ACCURACY_KEYS`: ``top1``, ``mean_per_class[_accuracy]``,
``mean[_accuracy]``, ``ci95``, ``top5``) anywhere under a protocol, named by their path: nested dicts
add their key, list entries of ``"results"``/``"settings"`` add ``k<k>`` or ``<n>way<k>shot``
(``"knn/k20/top1"``, ``"fewshot/5way1shot/mean_accuracy"``); the compact ``mean`` and
``mean_per_class`` are read as ``mean_accuracy`` and ``mean_per_class_accuracy``, so that both
shapes fill the same report column. Other numbers (``best_c``,
``num_train``, ...) are settings, not metrics. The **headline** metric of each group is its ``top1``,
else its ``mean``/``mean_accuracy``; on a dataset whose test classes are imbalanced (``"dataset":
{"imbalanced": true}``, which ``look evaluate`` records) it is the group's mean per-class
accuracy where it has one, as the evaluation protocol asks. Accuracies are returned **in percent**: a file whose ``"units"``
says percent is taken as is, one that says fraction is scaled by 100, and one without units is
scaled by 100 when all its accuracies lie in ``[0, 1]``, with a warning (percents all below 1
would be misread).

**Dataset**: the dataset name; an image folder (``"imagefolder"``, whatever its root) is named
after its root folder, ``"imagefolder:pets"`` for ``/data/pets``, so that evaluations on
different folders are not averaged together (:attr:`EvaluationResult.dataset_root` keeps the
root). **kNN neighbours**: when the training split had fewer images than a kNN ``k``, the ``k``
actually used (``k_effective``) is kept per metric group (``"knn/k200": 54``).

**Settings** (:func:`run_settings`): what a run was pre-trained and evaluated with that must agree
between the seeds averaged into one report row — the pre-training record (dataset, labels in full,
grouping path included, image size, subset, epochs, ...; not its seed), the checkpoint's step and
stem, the evaluation image size, splits, label set and class names, ``protocol_settings`` and the
settings each protocol records next to its result (kNN τ, few-shot queries and episodes, the
fine-tuning recipe, train/test sizes). Keyed by their JSON path (``"protocol_settings.knn.temperature"``);
seeds, checkpoint paths, devices and timings differ between seeds by design and are not settings.
A field the file lacks (the compact shape has few) is simply not compared. **Few-shot episodes**:
the episodes behind each few-shot group (``"fewshot/5way1shot": 600``) when recorded.

**Method label** (the row of a report, grouped across seeds): ``model.label`` when given, else the
method (``model.method`` or ``model.pretraining.method``, else the model name or backbone), then
``[backbone]``, ``(pre-training labels)`` and ``[head]`` for head-embedding features when known,
e.g. ``"look [resnet18] (coarse)"`` (``(no labels)`` for a method that reads none, MoCo v2's);
an external model gets ``(random init)`` or its weights file's name and the first digits of the
weights' SHA-256, ``"resnet50 [resnet50.safetensors 1f0c9a2b]"``, so that a random network, the
same architecture with weights, and two different weights files are never averaged as seeds of one
row (``look evaluate --label`` groups them deliberately). **Seed**: ``model.seed``, else the
pre-training seed, else the top-level evaluation ``seed``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "ACCURACY_KEYS",
    "HEADLINE_KEYS",
    "IMBALANCED_HEADLINE_KEYS",
    "RESULTS_FILE_NAME",
    "EvaluationResult",
    "IncompleteResultsWarning",
    "NonNumericAccuracyWarning",
    "ReportInputWarning",
    "canonical_setting",
    "describe_model",
    "fewshot_episodes",
    "is_number",
    "knn_k_effective",
    "method_label",
    "protocol_metrics",
    "read_json_object",
    "read_results_file",
    "run_settings",
    "setting_protocol",
]

RESULTS_FILE_NAME = "results.json"
ACCURACY_KEYS = (
    "top1",
    "top5",
    "mean_per_class",
    "mean_per_class_accuracy",
    "mean",
    "mean_accuracy",
    "ci95",
)
HEADLINE_KEYS = ("top1", "mean", "mean_accuracy")
# The headline on a dataset whose test classes are imbalanced (results.json's
# ``dataset.imbalanced``), as the evaluation protocol asks; few-shot keeps its mean accuracy.
IMBALANCED_HEADLINE_KEYS = ("mean_per_class_accuracy", "mean_per_class")
_LIST_KEYS = ("results", "settings")
# Values that say "no result" on purpose: a blank cell without a warning.
_BLANK_VALUES = frozenset({"", "n/a", "na", "-", "none", "null", "nan"})


class ReportInputWarning(UserWarning):
    """Something about the report's input files the user should know (printed without a
    Python source line by ``look report``)."""


class IncompleteResultsWarning(ReportInputWarning):
    """A ``results.json`` whose evaluation did not finish: its missing protocols are blank."""


class NonNumericAccuracyWarning(ReportInputWarning):
    """An accuracy given as something other than a number (e.g. the string ``"85.3"``): blank."""


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    """One evaluation (or one analysed feature set), normalised for reports.

    ``metrics`` are accuracies in percent keyed by path, ``headline`` the paths shown as report
    columns, ``multimodality`` the numeric summary of a ``"multimodality"`` entry (fractions and
    counts, as written), ``model`` the normalised model description of :func:`describe_model`,
    ``class_names`` the evaluation classes and ``feature_caches`` the feature cache file of each
    split when the evaluation recorded one. ``dataset_root`` is the root of a dataset named after
    its folder (an image folder), ``knn_k_effective`` the neighbours a kNN metric group really
    used where the training split was smaller than its ``k``. ``settings`` are the run's
    :func:`run_settings` (path → value as canonical JSON), ``fewshot_episodes`` the episodes of
    each few-shot group, ``protocol_problems`` what makes a protocol's figures doubtful, by
    protocol (:func:`protocol_problems`).
    """

    source: Path
    method: str
    seed: int | None
    dataset: str
    labels: str | None
    metrics: dict[str, float]
    headline: tuple[str, ...] = ()
    multimodality: dict[str, float] = dataclasses.field(default_factory=dict)
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    class_names: tuple[str, ...] = ()
    feature_caches: dict[str, Path] = dataclasses.field(default_factory=dict)
    dataset_root: str | None = None
    knn_k_effective: dict[str, int] = dataclasses.field(default_factory=dict)
    settings: dict[str, str] = dataclasses.field(default_factory=dict)
    fewshot_episodes: dict[str, int] = dataclasses.field(default_factory=dict)
    protocol_problems: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    @property
    def dataset_label(self) -> str:
        """Dataset name, with the label set when it is not the plain fine labels."""
        if self.labels in (None, "", "fine"):
            return self.dataset
        return f"{self.dataset} ({self.labels})"


def is_number(value: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _short_labels(value: object) -> str | None:
    """A label-set name; a grouping JSON path becomes its file stem."""
    if value is None or value == "":
        return None
    text = str(value)
    return Path(text).stem if text.endswith(".json") else text


def describe_model(model: object, *, content: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"name", "method", "seed", "pretrain_labels", "backbone", "label", "output"}`` of a
    ``results.json`` model entry (either shape; ``content`` is the whole file, for the top-level
    seed, labels and protocol outputs)."""
    content = content or {}
    raw: Mapping[str, Any] = (
        model if isinstance(model, Mapping) else {"name": model} if model else {}
    )
    pretraining = raw.get("pretraining") if isinstance(raw.get("pretraining"), Mapping) else {}
    labels = content.get("labels") if isinstance(content.get("labels"), Mapping) else {}
    seed = next(
        (
            int(s)
            for s in (raw.get("seed"), pretraining.get("seed"), content.get("seed"))
            if is_number(s)
        ),
        None,
    )
    protocols = content.get("protocols") if isinstance(content.get("protocols"), Mapping) else {}
    outputs = {p.get("features") for p in protocols.values() if isinstance(p, Mapping)}
    return {
        "name": raw.get("name"),
        "method": raw.get("method") or pretraining.get("method"),
        "seed": seed,
        "pretrain_labels": _short_labels(
            raw.get("pretrain_labels") or pretraining.get("labels") or labels.get("pretraining")
        ),
        "backbone": raw.get("backbone"),
        "label": raw.get("label"),
        "output": raw.get("output") or ("head" if "head" in outputs else None),
        "initialisation": _initialisation(raw, _weights_fingerprint(content)),
    }


def _weights_fingerprint(content: Mapping[str, Any]) -> str | None:
    """The SHA-256 of the evaluated weights that ``look evaluate`` records with the features."""
    features = content.get("features")
    fingerprint = features.get("weights_sha256") if isinstance(features, Mapping) else None
    return fingerprint if isinstance(fingerprint, str) and fingerprint else None


def _initialisation(model: Mapping[str, Any], fingerprint: str | None = None) -> str | None:
    """How an external (timm/torchvision) model's weights were set, for its row label:
    ``"random init"``, or the weights file's name with the first 8 digits of the weights'
    SHA-256 where known (every run names its export ``backbone.safetensors``); None for a look
    checkpoint or an unknown source. A random network and the same architecture loaded from a
    file are two rows, and so are two different weights files, never seeds of one row."""
    initialisation = model.get("initialisation")
    if not isinstance(initialisation, str) or not initialisation:
        return None
    if initialisation.startswith("random"):  # (look evaluate writes "random (seed 0)")
        return "random init"
    if initialisation != "weights file":  # (already a describe_model entry's)
        return initialisation
    weights = model.get("weights")
    if not weights:
        return None
    name = Path(str(weights)).name
    return f"{name} {fingerprint[:8]}" if fingerprint else name


def method_label(model: Mapping[str, Any] | str | None) -> str:
    """Row label of a run from a (raw or :func:`describe_model`) model entry; see module docs."""
    if isinstance(model, str) and model:
        return model
    if not isinstance(model, Mapping):
        return "unknown"
    if model.get("label"):
        return str(model["label"])
    pretraining = model.get("pretraining") if isinstance(model.get("pretraining"), Mapping) else {}
    backbone = model.get("backbone")
    base = str(
        model.get("method")
        or pretraining.get("method")
        or model.get("name")
        or backbone
        or "unknown"
    )
    label = base
    if backbone and str(backbone) != base:
        label += f" [{backbone}]"
    pretrain_labels = _short_labels(model.get("pretrain_labels") or pretraining.get("labels"))
    if pretrain_labels and not _reads_labels(base):
        pretrain_labels = "no labels"  # (MoCo v2: its data's label set never reached it)
    if pretrain_labels:
        label += f" ({pretrain_labels})"
    if model.get("output") == "head":
        label += " [head]"
    initialisation = _initialisation(model)
    if initialisation:
        label += (
            f" ({initialisation})" if initialisation == "random init" else f" [{initialisation}]"
        )
    return label


def _reads_labels(method: str) -> bool:
    """Whether pre-training method ``method`` reads labels (unknown names are taken to)."""
    from look.config import ConfigError
    from look.methods import get_method_class

    try:
        return bool(get_method_class(method).uses_labels)
    except ConfigError:
        return True


def _entry_name(entry: Mapping[str, Any], index: int) -> str:
    if is_number(entry.get("n_way")) and is_number(entry.get("k_shot")):
        return f"{int(entry['n_way'])}way{int(entry['k_shot'])}shot"
    if is_number(entry.get("k")):
        return f"k{int(entry['k'])}"
    return str(index)


def protocol_metrics(
    protocols: Mapping[str, Any],
    *,
    skipped: dict[str, object] | None = None,
    imbalanced: bool = False,
) -> tuple[dict[str, float], list[str]]:
    """Accuracy metrics (as found, not rescaled) and headline paths of a ``"protocols"`` object.

    Accuracy keys whose value is neither a number nor a deliberate blank (``null``, ``"n/a"``,
    ...) are added to ``skipped`` (path → value) when given. With ``imbalanced`` (test classes
    of imbalanced counts) a group's headline is its mean per-class accuracy where it has one.
    """
    leads = (*IMBALANCED_HEADLINE_KEYS, *HEADLINE_KEYS) if imbalanced else HEADLINE_KEYS
    metrics: dict[str, float] = {}
    headline: list[str] = []
    for name, subtree in protocols.items():
        name = str(name)
        if is_number(subtree):  # a protocol given as one number
            metrics[name] = float(subtree)
            headline.append(name)
            continue
        if skipped is not None and not (isinstance(subtree, Mapping) or _is_blank(subtree)):
            skipped[name] = subtree  # a protocol given as one value that is no number
        for path, node in _protocol_nodes(subtree, name, sep="/"):
            for key in ACCURACY_KEYS:
                if is_number(node.get(key)):
                    metrics[f"{path}/{key}"] = float(node[key])
                elif key in node and skipped is not None and not _is_blank(node[key]):
                    skipped[f"{path}/{key}"] = node[key]
            lead = next((key for key in leads if is_number(node.get(key))), None)
            if lead is not None:
                headline.append(f"{path}/{lead}")
    return metrics, headline


# The compact shape's short names of the evaluation format's metrics.
_METRIC_ALIASES = {"mean": "mean_accuracy", "mean_per_class": "mean_per_class_accuracy"}


def _canonical_metric(path: str) -> str:
    """``"fewshot/5way1shot/mean"`` → ``"fewshot/5way1shot/mean_accuracy"``: one name per
    metric whichever shape gave it (else a mix of shapes splits it over two columns)."""
    group, _, leaf = path.rpartition("/")
    return f"{group}/{_METRIC_ALIASES[leaf]}" if group and leaf in _METRIC_ALIASES else path


def _is_blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _BLANK_VALUES)


def _incomplete_reason(content: Mapping[str, Any]) -> str | None:
    """Why an evaluation's results are partial (``look evaluate`` writes ``"complete": false``
    after each protocol until the last one finishes), or ``None`` when they are whole."""
    if content.get("complete", True) is not False:
        return None
    reasons = []
    failed = content.get("failed_protocol")
    if isinstance(failed, Mapping):
        reasons.append(f"{failed.get('name')} failed ({failed.get('error')})")
    pending = content.get("pending_protocols")
    if isinstance(pending, list):
        waiting = [
            str(name)
            for name in pending
            if not isinstance(failed, Mapping) or name != failed.get("name")
        ]
        if waiting:
            reasons.append(f"{', '.join(waiting)} did not run")
    return "; ".join(reasons) or "the evaluation did not finish"


def knn_k_effective(protocols: Mapping[str, Any]) -> dict[str, int]:
    """``{"knn/k200": 54}`` for every kNN entry whose ``k_effective`` differs from its ``k``
    (either shape: a ``"results"`` list of ``{"k", "k_effective"}``, or ``{"k200": {...}}``)."""
    knn = protocols.get("knn")
    if not isinstance(knn, Mapping):
        return {}
    results = knn.get("results")
    named = (
        [(_entry_name(e, i), e) for i, e in enumerate(results) if isinstance(e, Mapping)]
        if isinstance(results, list)
        else [(str(key), entry) for key, entry in knn.items()]
    )
    return {
        f"knn/{name}": int(entry["k_effective"])
        for name, entry in named
        if isinstance(entry, Mapping)
        and is_number(entry.get("k_effective"))
        and name != f"k{int(entry['k_effective'])}"
    }


# Pre-training record entries that legitimately differ between the seeds of one setting.
_PER_RUN_KEYS = frozenset({"seed", "path", "checkpoint", "created", "timings_s", "look_version"})
# Settings a protocol records next to its result (older files have no "protocol_settings").
_PROTOCOL_RESULT_SETTINGS: dict[str, tuple[str, ...]] = {
    "linear": ("c_selection", "val_fraction", "max_iter", "tolerance", "num_train", "num_test"),
    "knn": ("temperature", "num_train", "num_test"),
    "fewshot": ("queries_per_class", "episodes"),
    "finetune": (
        "epochs",
        "lr",
        "batch_size",
        "weight_decay",
        "momentum",
        "augment",
        "num_train",
        "num_test",
    ),
}
# Sizes of the evaluation data: compared even where "protocol_settings" records the options.
_DATA_SIZE_KEYS = ("num_train", "num_test")
# Options that only decide which columns exist (k = 20 is the same column whatever else ran),
# or only whether a message is printed.
_COLUMN_OPTIONS = frozenset({"ks", "shots", "warn_few_episodes"})
_DATASET_SETTINGS = ("image_size", "train_split", "test_split", "num_classes", "class_names")


def canonical_setting(value: object) -> str:
    """A setting's value as compact, key-sorted JSON: equal settings give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def run_settings(content: Mapping[str, Any]) -> dict[str, str]:
    """The settings of one ``results.json`` (either shape) that the seeds averaged into one report
    row must share: JSON path → canonical JSON value (see the module docstring)."""
    settings: dict[str, str] = {}

    def put(path: str, value: object) -> None:
        if value is not None and value != "":
            settings[path] = canonical_setting(value)

    model = content.get("model") if isinstance(content.get("model"), Mapping) else {}
    for key in ("small_stem", "global_step", "pretrain_labels"):
        put(f"model.{key}", model.get(key))

    def put_flat(path: str, value: object) -> None:
        # A recipe's nested settings one path each, so that a conflict names the option
        # (model.pretraining.training.method_options.k), not the whole section.
        if isinstance(value, Mapping):
            for key, inner in value.items():
                put_flat(f"{path}.{key}", inner)
        else:
            put(path, value)

    pretraining = model.get("pretraining")
    if isinstance(pretraining, Mapping):
        for key, value in pretraining.items():
            if key not in _PER_RUN_KEYS:
                put_flat(f"model.pretraining.{key}", value)
    labels = content.get("labels")
    if isinstance(labels, Mapping):
        for key in ("evaluation", "evaluation_grouping"):
            put(f"labels.{key}", labels.get(key))
        # Duplicates of the pre-training record: compared only when the model has no record.
        for key, recorded in (("pretraining", "labels"), ("pretraining_dataset", "dataset")):
            if f"model.pretraining.{recorded}" not in settings:
                put(f"labels.{key}", labels.get(key))
    else:
        put("labels", labels)  # the compact shape: the full grouping path, not its stem
    dataset = content.get("dataset")
    if isinstance(dataset, Mapping):
        for key in _DATASET_SETTINGS:
            put(f"dataset.{key}", dataset.get(key))
    recorded_settings = content.get("protocol_settings")
    if isinstance(recorded_settings, Mapping):
        for protocol, options in recorded_settings.items():
            if isinstance(options, Mapping):
                for key, value in options.items():
                    if key not in _COLUMN_OPTIONS:
                        put(f"protocol_settings.{protocol}.{key}", value)
    else:
        recorded_settings = {}
    protocols = content.get("protocols")
    if isinstance(protocols, Mapping):
        for protocol, keys in _PROTOCOL_RESULT_SETTINGS.items():
            if protocol in recorded_settings:  # the options are compared there already
                keys = tuple(key for key in keys if key in _DATA_SIZE_KEYS)
            for path, node in _protocol_nodes(protocols.get(protocol), f"protocols.{protocol}"):
                for key in keys:
                    put(f"{path}.{key}", node.get(key))
    return settings


def _protocol_nodes(
    node: object, path: str, *, sep: str = "."
) -> list[tuple[str, Mapping[str, Any]]]:
    """A protocol's result object and its entries (``"settings"``/``"results"`` lists or nested
    objects such as the compact ``{"5way1shot": {...}}``), each with its path (parts joined by
    ``sep``), depth first. Accuracy keys hold values, not entries: they are not entered."""
    if not isinstance(node, Mapping):
        return []
    found: list[tuple[str, Mapping[str, Any]]] = [(path, node)]
    for key, child in node.items():
        if key in ACCURACY_KEYS:
            continue
        if isinstance(child, Mapping):
            found += _protocol_nodes(child, f"{path}{sep}{key}", sep=sep)
        elif key in _LIST_KEYS and isinstance(child, list):
            for index, entry in enumerate(child):
                if isinstance(entry, Mapping):
                    found += _protocol_nodes(
                        entry, f"{path}{sep}{_entry_name(entry, index)}", sep=sep
                    )
    return found


def setting_protocol(setting: str) -> str | None:
    """The protocol a setting of :func:`run_settings` belongs to (``"knn"`` for
    ``"protocol_settings.knn.temperature"``), ``None`` for one that concerns every protocol."""
    parts = setting.split(".")
    if parts[0] in ("protocol_settings", "protocols") and len(parts) > 2:
        return parts[1]
    return None


def protocol_problems(protocols: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """What ``look evaluate`` recorded against a protocol's figures, by protocol: a linear probe
    whose refit or grid fits stopped on their iteration limit, or whose C was chosen at an end of
    its grid (the best may lie beyond); few-shot settings run with fewer episodes than the
    protocol's minimum. What ``look evaluate`` was told not to warn about (a smoke run's narrow
    grid and few episodes) is left out, and so is a protocol without problems."""
    found = {"linear": _linear_problems(protocols.get("linear"))}
    fewshot = protocols.get("fewshot")
    # (a deliberate smoke run's few episodes were not warned about: older files lack the key)
    if (
        isinstance(fewshot, Mapping)
        and fewshot.get("episodes_below_spec")
        and fewshot.get("few_episodes_warned", True)
    ):
        minimum = fewshot.get("spec_min_episodes")
        found["fewshot"] = (
            "fewer episodes than the protocol's minimum"
            + (f" of {int(minimum)}" if is_number(minimum) else ""),
        )
    return {protocol: problems for protocol, problems in found.items() if problems}


def _linear_problems(linear: object) -> tuple[str, ...]:
    if not isinstance(linear, Mapping):
        return ()
    problems = []
    if linear.get("refit_converged") is False:
        problems.append(
            f"the refit did not converge (stopped on {linear.get('refit_stop_reason', 'max_iter')})"
        )
    curve = linear.get("validation_curve")
    failed = linear.get("grid_fits_not_converged")
    if is_number(failed) and failed > 0:
        total = f"/{len(curve)}" if isinstance(curve, list) else ""
        problems.append(f"{int(failed)}{total} fits of the C grid did not converge")
    edge = linear.get("c_at_grid_edge")
    if edge and linear.get("grid_edge_warned", True):  # (not when deliberately narrow)
        problems.append(f"C was chosen at the {edge} end of its grid")
    return tuple(problems)


def fewshot_episodes(protocols: Mapping[str, Any]) -> dict[str, int]:
    """``{"fewshot/5way1shot": 600}``: the episodes of every few-shot entry that records them."""
    return {
        path: int(node["episodes"])
        for path, node in _protocol_nodes(protocols.get("fewshot"), "fewshot", sep="/")[1:]
        if is_number(node.get("episodes"))
    }


def _dataset_identity(dataset: Mapping[str, Any]) -> tuple[str, str | None]:
    """Report name and root of a ``"dataset"`` entry: an image folder is named after its root."""
    name = str(dataset.get("name") or "unknown")
    root = dataset.get("root")
    if name != "imagefolder" or not isinstance(root, str) or not root:
        return name, None
    folder = Path(root).name or root  # "/" or "." have no name
    return f"{name}:{folder}", root


def read_json_object(path: Path) -> Mapping[str, Any]:
    """The JSON object in ``path``; ``ValueError`` naming the file when it is not one."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(content, Mapping):
        raise ValueError(f"{path} must hold a JSON object, got {type(content).__name__}")
    return content


def _percent_scale(content: Mapping[str, Any], metrics: Mapping[str, float], path: Path) -> float:
    units = str(content.get("units") or "").lower()
    if "percent" in units:
        return 1.0
    if "fraction" in units:
        return 100.0
    if not all(0.0 <= v <= 1.0 for v in metrics.values()):
        return 1.0
    # A guess (another tool's file): say so, since percents all below 1 (a model at chance on
    # 1000 classes) would be read as fractions.
    warnings.warn(
        f"results file {path} records no units and its accuracies all lie in [0, 1]: they are "
        'read as fractions (x100). If they are percents, add "units": "accuracies in percent" '
        "to the file",
        RuntimeWarning,
        stacklevel=3,
    )
    return 100.0


def multimodality_summary(value: object) -> dict[str, float]:
    """Numeric values of a multi-modality entry's ``"summary"`` (or of the entry itself)."""
    if not isinstance(value, Mapping):
        return {}
    summary = value.get("summary", value)
    if not isinstance(summary, Mapping):
        return {}
    return {str(key): float(v) for key, v in summary.items() if is_number(v)}


def read_results_file(path: str | Path) -> EvaluationResult:
    """Read one ``results.json`` of either shape (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file {path} does not exist")
    content = read_json_object(path)
    protocols = content.get("protocols")
    if not isinstance(protocols, Mapping):
        protocols = {}
    skipped: dict[str, object] = {}
    dataset_entry = content.get("dataset")
    imbalanced = isinstance(dataset_entry, Mapping) and dataset_entry.get("imbalanced") is True
    metrics, headline = protocol_metrics(protocols, skipped=skipped, imbalanced=imbalanced)
    if skipped:
        listed = ", ".join(f"{key} = {value!r}" for key, value in skipped.items())
        warnings.warn(
            NonNumericAccuracyWarning(
                f"results file {path}: {listed} is not a number, so its cell is left blank "
                "(write a JSON number, or null for no result)"
            ),
            stacklevel=2,
        )
    incomplete = _incomplete_reason(content)
    if incomplete is not None:
        warnings.warn(
            IncompleteResultsWarning(
                f"results file {path} is incomplete: {incomplete}; its other protocols are "
                "reported, the missing ones are blank (re-run look evaluate to complete it)"
            ),
            stacklevel=2,
        )
    scale = _percent_scale(content, metrics, path)
    out_of_range = {key: value for key, value in metrics.items() if not 0 <= value * scale <= 100}
    if out_of_range:
        key, value = next(iter(out_of_range.items()))
        raise ValueError(
            f"results file {path}: {key} is {value}, not an accuracy (percent in [0, 100], or a "
            "fraction in [0, 1])"
        )
    dataset = content.get("dataset")
    class_names: tuple[str, ...] = ()
    dataset_root = None
    if isinstance(dataset, Mapping):
        names = dataset.get("class_names")
        class_names = tuple(str(n) for n in names) if isinstance(names, list) else ()
        dataset, dataset_root = _dataset_identity(dataset)
    labels = content.get("labels")
    if isinstance(labels, Mapping):
        labels = labels.get("evaluation")
    caches: dict[str, Path] = {}
    features = content.get("features")
    if isinstance(features, Mapping):
        for split, info in features.items():
            if isinstance(info, Mapping) and isinstance(info.get("cache_path"), str):
                caches[str(split)] = Path(info["cache_path"])
    model = describe_model(content.get("model"), content=content)
    return EvaluationResult(
        source=path,
        method=method_label(model),
        seed=model["seed"],
        dataset=str(dataset or "unknown"),
        labels=_short_labels(labels),
        # Sorted so that a name given twice (mean and mean_accuracy) keeps the evaluation's own.
        metrics={
            _canonical_metric(key): metrics[key] * scale
            for key in sorted(metrics, key=lambda k: k != _canonical_metric(k), reverse=True)
        },
        headline=tuple(dict.fromkeys(_canonical_metric(path) for path in headline)),
        multimodality=multimodality_summary(content.get("multimodality")),
        model=model,
        class_names=class_names,
        feature_caches=caches,
        dataset_root=dataset_root,
        knn_k_effective=knn_k_effective(protocols),
        settings=run_settings(content),
        fewshot_episodes=fewshot_episodes(protocols),
        protocol_problems=protocol_problems(protocols),
    )
