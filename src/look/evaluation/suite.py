"""``evaluate``: run the transfer protocols on one model and one dataset, write ``results.json``.

Frozen-feature protocols (linear probe, kNN, few-shot) share one feature extraction per split,
cached on disk; fine-tuning trains a copy of the backbone. ``results.json`` holds plain numbers
(accuracies in percent) and the metadata needed to reproduce them: model identity and weights
fingerprint, dataset, pre-training and evaluation labels, image size, protocol settings, seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import look
from look.atomic import atomic_write_text
from look.data import (
    DATASET_COARSE_GROUPING,
    DATASET_NAMES,
    DataInfo,
    DataSpec,
    EvalDataset,
    build_eval_dataset,
    describe,
    each_folder_listed_once,
    resolve_image_size,
)
from look.data.spec import resolve_root
from look.engine.distributed import get_world_size, is_distributed, is_main_process
from look.engine.stop_signals import (
    DEFAULT_STOP_SIGNALS,
    RunStopped,
    StopSignals,
    signal_numbers,
)
from look.evaluation.features import (
    DEFAULT_FEATURE_CACHE_DIR,
    FeatureSet,
    check_stop,
    data_files_fingerprint,
    feature_cache_key,
    files_at,
    keep_readable,
    load_or_extract_features,
)
from look.evaluation.fewshot import FewShotOptions, check_fewshot_feasible, fewshot_evaluate
from look.evaluation.finetune import FinetuneOptions, finetune
from look.evaluation.knn import KnnOptions, knn_classify
from look.evaluation.linear_probe import LinearProbeOptions, class_count_ratio, linear_probe
from look.evaluation.model_source import (
    FeatureModel,
    LoadedModel,
    ModelSource,
    architecture_of,
    load_model,
    state_fingerprint,
)
from look.models import check_input_size

__all__ = [
    "PROTOCOLS",
    "RESULTS_FILE",
    "evaluate",
    "parse_dataset_spec",
    "resolve_eval_device",
    "resolve_protocols",
]

PROTOCOLS: tuple[str, ...] = ("linear", "knn", "finetune", "fewshot")
RESULTS_FILE = "results.json"
# Fine-tuning's per-epoch checkpoints, inside the output folder until it finishes.
FINETUNE_CHECKPOINT_DIR = "finetune_checkpoints"
_SYNTHETIC_KEYS = {
    "samples": "synthetic_num_samples",
    "classes": "synthetic_num_classes",
    "size": "synthetic_image_size",
}
_ROOTED = ("fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder")
DATASET_SPEC_HELP = (
    "fashion_mnist[:ROOT], mnist[:ROOT], digits, cifar10[:ROOT], cifar100[:ROOT], "
    "imagefolder:ROOT, synthetic[:samples=N,classes=C,size=S]"
)


def parse_dataset_spec(
    text: str, *, download: bool = False, corrupt_images: str = "fail"
) -> DataSpec:
    """Parse a dataset SPEC (see :data:`DATASET_SPEC_HELP`) into a :class:`DataSpec`.

    ``cifar10:/data/cifar`` reads torchvision's layout under that root; ``imagefolder:ROOT`` needs
    a root with one sub-folder per class (or ``train/`` and ``val/``/``test/`` sub-folders), and
    ``corrupt_images`` says what its unreadable files do (``"fail"`` or ``"skip"``).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty dataset spec; use one of: {DATASET_SPEC_HELP}")
    name, _, argument = text.strip().partition(":")
    name = name.strip().lower().replace("-", "_")
    if name not in DATASET_NAMES:
        raise ValueError(
            f"unknown dataset {name!r} in spec {text!r}; use one of: {DATASET_SPEC_HELP}"
        )
    if name == "synthetic":
        options: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in argument.split(","))):
            key, _, value = item.partition("=")
            if key not in _SYNTHETIC_KEYS or not value.strip().isdigit():
                raise ValueError(
                    f"synthetic option {item!r} in {text!r}: use samples=N, classes=C, size=S"
                )
            options[_SYNTHETIC_KEYS[key]] = int(value)
        return DataSpec(dataset=name, download=download, **options)  # type: ignore[arg-type]
    if name == "digits":
        if argument:
            raise ValueError(f"digits takes no root (it ships with scikit-learn), got {text!r}")
        return DataSpec(dataset=name)
    if name == "imagefolder" and not argument:
        raise ValueError(
            "imagefolder needs a root: imagefolder:ROOT, ROOT holding one sub-folder per class "
            "(or train/ and val/ or test/ sub-folders of that form)"
        )
    assert name in _ROOTED
    return DataSpec(
        dataset=name, root=argument or None, download=download, corrupt_images=corrupt_images
    )


def resolve_protocols(protocols: str | Sequence[str]) -> tuple[str, ...]:
    """``"all"``, one name, a comma-separated string or a sequence → protocol names, in run order."""
    items = [protocols] if isinstance(protocols, str) else list(protocols)
    names: list[str] = []
    for item in items:
        names += [part.strip() for part in str(item).split(",") if part.strip()]
    if not names:
        raise ValueError(f"no protocol given; choose from {', '.join(PROTOCOLS)} or all")
    if "all" in names:
        return PROTOCOLS
    unknown = sorted(set(names) - set(PROTOCOLS))
    if unknown:
        raise ValueError(
            f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)} or all"
        )
    return tuple(p for p in PROTOCOLS if p in names)


def resolve_eval_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``; under torchrun the rank's own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r} must be auto, cpu or cuda")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but no CUDA device is available; use cpu or auto")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _choose_image_size(
    image_size: int | None, loaded: LoadedModel, spec: DataSpec
) -> tuple[int, str]:
    """The evaluation image size and where it came from."""
    if image_size is not None:
        if image_size < 8:
            raise ValueError(f"image_size={image_size} is too small; use 8 or more")
        return image_size, "--image-size"
    pretrained = (loaded.pretraining or {}).get("image_size")
    if isinstance(pretrained, int):
        return pretrained, "pre-training config"
    return resolve_image_size(spec), "dataset default"


def _split_features(
    split: str,
    spec: DataSpec,
    built: tuple[EvalDataset, DataInfo],
    *,
    feature_model: FeatureModel,
    fingerprint: str,
    loaded: LoadedModel,
    output: str,
    cache_dir: str | Path | None,
    cache_max_bytes: int | None,
    cache_in_use: set[Path],
    device: torch.device,
    batch_size: int,
    num_workers: int,
    autocast_dtype: torch.dtype | None,
    progress: bool,
    stop: StopSignals,
) -> tuple[FeatureSet, torch.Tensor, Any]:
    """Features of ``split`` (cached), its evaluation labels and the dataset's DataInfo.

    Images whose file could not be decoded (``corrupt_images="skip"``) are left out of the
    features and labels returned (``FeatureSet.unreadable`` still lists them).
    """
    dataset, info = built
    fine_labels = torch.as_tensor(dataset.fine_labels, dtype=torch.int64)
    key = feature_cache_key(
        weights_fingerprint=fingerprint,
        model_identity=loaded.identity,
        output=output,
        # The training subset does not change the test split: its features are shared.
        dataset_spec=spec if split == spec.split_train else dataclasses.replace(spec, subset=None),
        split=split,
        image_size=info.image_size,
        transform=dataset.transform,
        fine_labels=fine_labels,
        precision="bf16" if autocast_dtype == torch.bfloat16 else "fp32",
        files_fingerprint=data_files_fingerprint(spec, dataset.source),
    )
    feature_set = load_or_extract_features(
        feature_model,
        dataset,
        fine_labels,
        cache_key=key,
        cache_dir=cache_dir,
        cache_max_bytes=cache_max_bytes,
        cache_in_use=cache_in_use,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        autocast_dtype=autocast_dtype,
        progress=progress,
        description=f"{spec.dataset} {split} features",
        meta={"model": json.dumps(loaded.identity), "split": split, "output": output},
        stop=stop,
    )
    keep = keep_readable(feature_set.unreadable, dataset, f"{spec.dataset} {split} split")
    if not feature_set.unreadable:  # no copy of the whole matrix (1M × 2048 floats: 8 GB)
        return feature_set, dataset.labels, info
    readable = dataclasses.replace(
        feature_set,
        features=feature_set.features[keep],
        fine_labels=feature_set.fine_labels[keep],
    )
    return readable, dataset.labels[keep], info


def _warn_if_enlarged(dataset: EvalDataset, size: int) -> None:
    """Warn when an image folder's first image is under half the evaluation size it gets by
    default (224 px): 20-px images enlarged 11 times, slowly, without a word."""
    paths = dataset.source.file_paths
    if not paths:
        return
    from PIL import Image

    try:
        with Image.open(paths[0]) as image:  # (its header only)
            width, height = image.size
    except (OSError, ValueError, SyntaxError):
        return  # an unreadable file is reported where it is decoded
    if 2 * max(width, height) <= size:
        warnings.warn(
            f"the images are evaluated at {size} px, an image folder's default, but they are "
            f"small ({paths[0]} is {width}x{height}): pass --image-size (image_size) to evaluate "
            "them nearer their own size, at a fraction of the cost",
            UserWarning,
            stacklevel=3,
        )


def _check_evaluation_data(spec: DataSpec, labels: str) -> None:
    """Refuse, before any work and in evaluate's own terms, data that cannot be evaluated."""
    # Synthetic data builds its own coarse grouping; other datasets need a shipped one.
    if (
        labels == "coarse"
        and spec.dataset != "synthetic"
        and spec.dataset not in DATASET_COARSE_GROUPING
    ):
        shipped = ", ".join(f"{d}: {g}" for d, g in DATASET_COARSE_GROUPING.items())
        raise ValueError(
            f"--labels coarse needs a shipped grouping, and {spec.dataset!r} has none "
            f"(shipped: {shipped}); pass a grouping JSON mapping each fine class name to a "
            "coarse class name instead: --labels path/to/grouping.json"
        )
    if spec.dataset == "imagefolder" and spec.root is not None:
        root = resolve_root(spec)
        if not root.is_dir():
            raise FileNotFoundError(
                f"imagefolder root {root} does not exist; pass --dataset imagefolder:ROOT with "
                "ROOT holding train/ and val/ (or test/) sub-folders of one folder per class"
            )
        if not (root / spec.split_train).is_dir():
            # Without train/ the data layer would take the root as the training split itself,
            # and evaluation has no option to test on it.
            raise FileNotFoundError(
                f"imagefolder root {root} has no {spec.split_train}/ folder; look evaluate needs "
                f"the images it learns from in {root / spec.split_train}/<class>/ and the images "
                f"it tests on in {root / 'val'}/<class>/ (or {root / 'test'}/<class>/): move "
                "the class folders into such sub-folders"
            )


def _split_folder(spec: DataSpec, dataset: EvalDataset, split: str) -> str:
    """The folder an image folder's ``split`` was read from (``test`` falls back to ``val/``);
    ``split`` itself for other datasets."""
    paths = dataset.source.file_paths
    if spec.dataset != "imagefolder" or not paths:
        return split
    return Path(os.path.relpath(paths[0], resolve_root(spec))).parts[0]


def _run_protocol(
    name: str,
    *,
    split_data: Mapping[str, tuple[FeatureSet, torch.Tensor, Any]],
    options: Mapping[str, Any],
    seed: int,
    device: torch.device,
    num_classes: int | None,
    loaded: LoadedModel,
    spec: DataSpec,
    labels: str,
    num_workers: int,
    batch_size: int,
    autocast_dtype: torch.dtype | None,
    progress: bool,
    output_dir: Path,
    stop_signals: Sequence[str],
) -> dict[str, Any]:
    """One protocol's results (frozen-feature protocols read the extracted ``split_data``)."""
    if name == "finetune":
        return finetune(
            loaded.backbone,
            loaded.feature_dim,
            spec,
            labels=labels,
            options=options["finetune"],
            seed=seed,
            device=device,
            num_workers=num_workers,
            eval_batch_size=batch_size,
            autocast_dtype=autocast_dtype,
            progress=progress,
            # A long fine-tuning that is killed resumes from its last epoch on a re-run; one
            # stopped by a signal, from the step it stopped at.
            checkpoint_dir=output_dir / FINETUNE_CHECKPOINT_DIR,
            stop_signals=stop_signals,
            architecture=architecture_of(loaded.identity),
        )
    test_set, test_labels, _ = split_data["test"]
    if name == "fewshot":
        return fewshot_evaluate(
            test_set.features, test_labels, options=options["fewshot"], seed=seed, device=device
        )
    train_set, train_labels, _ = split_data["train"]
    if name == "linear":
        return linear_probe(
            train_set.features,
            train_labels,
            test_set.features,
            test_labels,
            options=options["linear"],
            seed=seed,
            device=device,
            num_classes=num_classes,
        )
    return knn_classify(
        train_set.features,
        train_labels,
        test_set.features,
        test_labels,
        options=options["knn"],
        device=device,
        num_classes=num_classes,
    )


def _report_content(
    *,
    loaded: LoadedModel,
    use_head: bool,
    spec: DataSpec,
    size: int,
    size_origin: str,
    test_split: str,
    info: DataInfo,
    labels: str,
    results: Mapping[str, Any],
    settings: Mapping[str, Any],
    features_info: Mapping[str, Any],
    seed: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    timings: Mapping[str, float],
    label: str | None,
    test_balance: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``results.json`` object (see :mod:`look.analysis.results` for the format)."""
    return {
        "format": "look-evaluation/1",
        "look_version": look.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "units": "accuracies in percent",
        "model": {
            **loaded.identity,
            **({"label": label} if label else {}),  # the report's row label, when given
            # The backbone's; the frozen protocols' own size is features.*.feature_dim (the
            # head's with --head).
            "feature_dim": loaded.feature_dim,
            "frozen_feature_dim": loaded.head_dim if use_head else loaded.feature_dim,
            "frozen_features": (
                f"L2-normalised projection head embedding normalize(g(f(x))), dim {loaded.head_dim}"
                if use_head
                else "backbone global-pool features f(x)"
            ),
            "pretraining": loaded.pretraining,
        },
        "dataset": {
            "name": spec.dataset,
            # Absolute, so that reports tell folders apart whatever directory evaluate ran in.
            "root": str(resolve_root(spec).resolve()) if spec.root is not None else None,
            "description": describe(spec),
            "image_size": size,
            "image_size_from": size_origin,
            "train_split": spec.split_train,
            "train_subset": spec.subset,  # (look evaluate --train-subset; None: the whole split)
            "test_split": test_split,
            "num_classes": info.num_classes,
            "class_names": list(info.class_names),
            # The protocol reports mean per-class accuracy where the test classes are
            # imbalanced: look report then makes it the headline of every protocol.
            **test_balance,
        },
        "labels": {
            "evaluation": labels,
            "evaluation_grouping": info.grouping,
            "pretraining": (loaded.pretraining or {}).get("labels"),
            "pretraining_dataset": (loaded.pretraining or {}).get("dataset"),
        },
        "protocols": dict(results),
        "protocol_settings": dict(settings),
        "features": dict(features_info),
        "seed": seed,
        "device": str(device),
        "precision": "bf16 autocast" if autocast_dtype is not None else "fp32",
        "world_size": get_world_size(),
        "distributed": is_distributed(),
        "timings_s": dict(timings),
    }


# (each image folder split listed once: by rank 0 under torchrun, and fine-tuning's splits
# reuse the frozen protocols' listings)
@each_folder_listed_once()
def evaluate(
    model_source: ModelSource | str | Path,
    dataset_spec: DataSpec | str,
    protocols: str | Sequence[str] = "all",
    *,
    labels: str = "fine",
    output_dir: str | Path,
    image_size: int | None = None,
    device: str = "auto",
    batch_size: int = 256,
    num_workers: int | None = None,
    cache_dir: str | Path | None = DEFAULT_FEATURE_CACHE_DIR,
    cache_max_gb: float | None = None,
    seed: int = 0,
    use_head: bool = False,
    progress: bool = True,
    linear_options: LinearProbeOptions | None = None,
    knn_options: KnnOptions | None = None,
    finetune_options: FinetuneOptions | None = None,
    fewshot_options: FewShotOptions | None = None,
    stop_signals: Sequence[str] = DEFAULT_STOP_SIGNALS,
    label: str | None = None,
) -> dict[str, Any]:
    """Evaluate a model with the transfer ``protocols`` and write ``output_dir/results.json``.

    Args:
        model_source: a :class:`ModelSource`, or a path (run directory, ``ckpt-*.pt`` or exported
            ``.safetensors``).
        dataset_spec: a :class:`DataSpec` or a SPEC string (see :func:`parse_dataset_spec`).
        protocols: ``"all"`` or any of ``linear``, ``knn``, ``finetune``, ``fewshot``.
        labels: evaluation labels: ``"fine"``, ``"coarse"`` or a grouping JSON path.
        output_dir: where ``results.json`` goes (created).
        image_size: evaluation image size; default: the pre-training image size recorded with the
            model, else the dataset's own size.
        device: ``auto``, ``cpu`` or ``cuda``; under ``torch.distributed`` each rank uses its GPU.
        batch_size: images per forward pass during feature extraction.
        num_workers: DataLoader workers; ``None``: 0 on CPU, up to 8 on CUDA.
        cache_dir: feature cache folder; ``None`` disables the cache.
        cache_max_gb: after writing features, delete the cache's least recently used files
            until it takes at most this many GB (what this process used stays); ``None``: no
            limit (a warning once it passes 50 GB).
        seed: seeds the validation split, random initialisation, fine-tuning and episodes.
        use_head: frozen-feature protocols use the L2-normalised projection-head embedding
            instead of the pooled backbone features (fine-tuning always uses the backbone).
        stop_signals: signal names that stop the evaluation (``()``: the signals keep their
            usual effect): fine-tuning saves the step in progress and raises
            :class:`~look.engine.stop_signals.TrainingStopped`, a re-run resumes it; a feature
            extraction stops after its batch in progress, and a signal during a frozen
            protocol stops the evaluation before the next protocol, raising
            :class:`~look.engine.stop_signals.EvaluationStopped` (a re-run reuses the cached
            features; the frozen protocols are short and simply re-run).
        label: the row this model takes in ``look report`` (``model.label``; default: its
            method, backbone and pre-training labels), e.g. to keep two recipes of one method
            apart.

    Returns:
        The dict written to ``results.json`` (accuracies in percent).
    """
    started = time.perf_counter()
    chosen = resolve_protocols(protocols)
    options = {
        "linear": linear_options or LinearProbeOptions(),
        "knn": knn_options or KnnOptions(),
        "finetune": finetune_options or FinetuneOptions(),
        "fewshot": fewshot_options or FewShotOptions(),
    }
    for name in chosen:  # bad settings fail before any expensive work
        options[name].validate()  # type: ignore[attr-defined]
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    if cache_max_gb is not None and not 0 < cache_max_gb < math.inf:  # (NaN too)
        raise ValueError(f"cache_max_gb={cache_max_gb} must be a positive number of GB")
    signal_numbers(stop_signals)  # a name that cannot stop a run fails now
    if seed < 0:
        raise ValueError(f"seed={seed} must be non-negative")
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise ValueError(f"label={label!r}: give a non-empty row label, or none")
    if not isinstance(labels, str) or not labels:
        raise ValueError("labels must be 'fine', 'coarse' or a path to a grouping JSON")
    if labels.endswith(".json") and not Path(labels).expanduser().is_file():
        raise FileNotFoundError(f"grouping file {labels!r} does not exist")
    source = (
        model_source
        if isinstance(model_source, ModelSource)
        else ModelSource(checkpoint=model_source)
    )
    spec = parse_dataset_spec(dataset_spec) if isinstance(dataset_spec, str) else dataset_spec
    _check_evaluation_data(spec, labels)
    torch_device = resolve_eval_device(device)
    autocast_dtype = torch.bfloat16 if torch_device.type == "cuda" else None
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if torch_device.type == "cuda" else 0

    loaded = load_model(source, use_head=use_head, seed=seed)
    size, size_origin = _choose_image_size(image_size, loaded, spec)
    check_input_size(loaded.backbone, size)  # too small: one clear error before any data is read
    spec = dataclasses.replace(spec, image_size=size, labels=labels)
    output = "head" if use_head else "backbone"

    # Stop signals end the evaluation between two batches of an extraction or before a
    # protocol (fine-tuning catches its own, to save the step in progress).
    with StopSignals(stop_signals) as stop:
        timings: dict[str, float] = {}
        results: dict[str, Any] = {}
        features_info: dict[str, Any] = {}
        frozen = [p for p in chosen if p != "finetune"]
        split_data: dict[str, tuple[FeatureSet, torch.Tensor, Any]] = {}
        datasets: dict[str, tuple[EvalDataset, DataInfo]] = {}
        if frozen:
            feature_model = FeatureModel(loaded.backbone, loaded.head).to(torch_device)
            fingerprint = state_fingerprint(feature_model)
            splits = ["test"] if frozen == ["fewshot"] else ["train", "test"]
            cache_in_use: set[Path] = set()  # (this evaluation's cache files: a limit keeps them)
            datasets = {split: build_eval_dataset(spec, split, labels) for split in splits}
            if "fewshot" in frozen:  # too few test images per class fails before any extraction
                check_fewshot_feasible(datasets["test"][0].labels, options["fewshot"])  # type: ignore[arg-type]
            for split in splits:
                split_data[split] = _split_features(
                    split,
                    spec,
                    datasets[split],
                    feature_model=feature_model,
                    fingerprint=fingerprint,
                    loaded=loaded,
                    output=output,
                    cache_dir=cache_dir,
                    cache_max_bytes=None if cache_max_gb is None else int(cache_max_gb * 1e9),
                    cache_in_use=cache_in_use,
                    device=torch_device,
                    batch_size=batch_size,
                    num_workers=num_workers,
                    autocast_dtype=autocast_dtype,
                    progress=progress,
                    stop=stop,
                )
                feature_set = split_data[split][0]
                features_info[split] = {
                    "num_images": len(feature_set.features),
                    "unreadable_files": files_at(datasets[split][0].source, feature_set.unreadable),
                    "feature_dim": int(feature_set.features.shape[1]),
                    "from_cache": feature_set.from_cache,
                    "cache_key": feature_set.cache_key,
                    "cache_path": str(feature_set.cache_path) if feature_set.cache_path else None,
                    "seconds": feature_set.seconds,
                    "images_per_second": feature_set.images_per_second,
                }
            timings["features"] = sum(split_data[s][0].seconds for s in splits)
            features_info["weights_sha256"] = fingerprint

        info = next(iter(split_data.values()))[2] if split_data else None
        num_classes = info.num_classes if info is not None else None
        test_data = datasets.get("test") or build_eval_dataset(spec, "test", labels)
        if info is None:
            info = test_data[1]
        if size_origin == "dataset default":
            _warn_if_enlarged(test_data[0], size)
        test_ratio = class_count_ratio(torch.as_tensor(test_data[0].labels))
        test_balance = {
            "test_class_count_ratio": test_ratio,
            "imbalanced": test_ratio > options["linear"].imbalance_ratio,  # type: ignore[attr-defined]
        }

        test_split = _split_folder(spec, test_data[0], "test")  # (once: not at every report)

        def write_report(
            *, pending: Sequence[str], failed: tuple[str, BaseException] | None
        ) -> None:
            """(Re)write results.json; written after every protocol, so that a later protocol's
            failure (or a killed job) keeps the finished ones, marked as incomplete."""
            timings["total"] = time.perf_counter() - started
            report.clear()
            report.update(
                _report_content(
                    loaded=loaded,
                    use_head=use_head,
                    spec=spec,
                    size=size,
                    size_origin=size_origin,
                    test_split=test_split,
                    info=info,
                    labels=labels,
                    results=results,
                    settings={
                        name: dataclasses.asdict(options[name])  # type: ignore[call-overload]
                        for name in chosen
                    },
                    features_info=features_info,
                    seed=seed,
                    device=torch_device,
                    autocast_dtype=autocast_dtype,
                    timings=timings,
                    label=label,
                    test_balance=test_balance,
                )
            )
            report["complete"] = not pending and failed is None
            if pending:
                report["pending_protocols"] = list(pending)
            if failed is not None:
                name, error = failed
                report["failed_protocol"] = {
                    "name": name,
                    "error": f"{type(error).__name__}: {error}",
                }
            if is_main_process():
                atomic_write_text(
                    Path(output_dir) / RESULTS_FILE, json.dumps(report, indent=2) + "\n"
                )

        report: dict[str, Any] = {}
        # Frozen-feature protocols first (cheap once features exist), fine-tuning last.
        order = [p for p in chosen if p != "finetune"] + [p for p in chosen if p == "finetune"]
        for position, name in enumerate(order):
            protocol_started = time.perf_counter()
            try:
                check_stop(stop, f"the evaluation, before its {name} protocol")
                with warnings.catch_warnings():
                    if not is_main_process():  # every rank computes the same results: warn once
                        warnings.simplefilter("ignore")
                    results[name] = _run_protocol(
                        name,
                        split_data=split_data,
                        options=options,
                        seed=seed,
                        device=torch_device,
                        num_classes=num_classes,
                        loaded=loaded,
                        spec=spec,
                        labels=labels,
                        num_workers=num_workers,
                        batch_size=batch_size,
                        autocast_dtype=autocast_dtype,
                        progress=progress,
                        output_dir=Path(output_dir),
                        stop_signals=stop_signals,
                    )
            # Written even when nothing has finished: an older results.json in the folder must not
            # go on saying it is complete.
            # Not a failure: the same command goes on (fine-tuning from its saved step).
            except RunStopped:
                write_report(pending=order[position:], failed=None)
                raise
            except BaseException as error:  # KeyboardInterrupt too: keep what finished
                write_report(pending=order[position:], failed=(name, error))
                raise
            if name != "finetune":
                results[name]["features"] = output
            timings[name] = time.perf_counter() - protocol_started
            write_report(pending=order[position + 1 :], failed=None)
        return report
