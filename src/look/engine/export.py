"""Export the backbone of a pre-training checkpoint as a timm/torchvision-compatible safetensors file."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from look.data import DataSpec, resolve_image_size
from look.data.transforms import NORMALIZATION
from look.engine.checkpoint import (
    find_checkpoint_files,
    load_checkpoint,
    load_latest_checkpoint,
    require_look_checkpoint,
)
from look.models import create_backbone, export_backbone
from look.models.weights import backbone_state_from_checkpoint, load_backbone_state


def load_checkpoint_from(path: str | Path) -> dict:
    """A run directory (its newest good checkpoint), its ``checkpoints`` folder, or one
    checkpoint file; anything that is not a `look pretrain` checkpoint is refused by name."""
    path = Path(path)
    if path.is_dir():
        # The run directory, or its checkpoints folder itself.
        folder = path if find_checkpoint_files(path) else path / "checkpoints"
        loaded = load_latest_checkpoint(folder)
        if loaded is None:
            raise FileNotFoundError(
                f"no checkpoint found in {folder}; pass a run directory of `look pretrain` or "
                "one of its checkpoints/ckpt-*.pt files"
            )
        return require_look_checkpoint(*loaded)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return require_look_checkpoint(load_checkpoint(path), path)


# Options that change how fast a run goes, not what it learns (the same neighbours, the same
# global batch): left out of training_settings, so runs differing in them still average.
_SPEED_ONLY_METHOD_OPTIONS = frozenset({"chunk_size", "search_backend", "search_prefilter"})
_SPEED_ONLY_OPTIM_OPTIONS = frozenset({"grad_accum_steps"})


def _couples_batch_items(method: Mapping[str, Any]) -> bool:
    """Whether the named method's loss couples the items of a micro-batch (unknown: no)."""
    from look.config import ConfigError
    from look.methods import get_method_class  # (the methods import the engine)

    try:
        return get_method_class(str(method.get("name"))).loss_couples_batch_items
    except ConfigError:
        return False


def training_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a pre-training run's recipe decides beyond its data and seed: the method's options
    and the optimiser's, the augmentation, the backbone's arguments and initial weights.

    ``look report`` averages the seeds of a row only when these agree (a k = 5 run and a k = 50
    run under one label are not two seeds of one thing). Speed-only options are left out.
    """
    method = config.get("method") if isinstance(config.get("method"), Mapping) else {}
    optim = config.get("optim") if isinstance(config.get("optim"), Mapping) else {}
    data = config.get("data") if isinstance(config.get("data"), Mapping) else {}
    model = config.get("model") if isinstance(config.get("model"), Mapping) else {}
    # A method whose loss couples the items of a micro-batch learns differently with another A.
    speed_only_optim = frozenset() if _couples_batch_items(method) else _SPEED_ONLY_OPTIM_OPTIONS
    # With k_fraction LOOK derives k from the data: the config's k (the default) is not used.
    unused = {"k"} if method.get("k_fraction") is not None else set()
    settings: dict[str, Any] = {
        "method_options": {
            key: value for key, value in method.items()
            if key != "name" and key not in _SPEED_ONLY_METHOD_OPTIONS and key not in unused
        },
        "optim": {key: value for key, value in optim.items() if key not in speed_only_optim},
        "augment": data.get("augment"),
        "backbone_kwargs": dict(model.get("backbone_kwargs") or {}),
        "pretrained_weights": initial_weights_name(model.get("pretrained_weights")),
    }  # fmt: skip
    return {key: value for key, value in settings.items() if value not in (None, {})}


def initial_weights_name(path: object) -> str | None:
    """``model.pretrained_weights`` as the runs of one recipe share it: the file's name, not its
    folder (each node may read its own copy; the path is not a setting)."""
    return Path(str(path)).name if path else None


def pretraining_metadata(config: Mapping[str, Any]) -> dict[str, str]:
    """Export metadata entries that tell evaluation how the backbone was pre-trained.

    ``dataset`` and ``labels`` (``data.labels``: ``fine``, ``coarse`` or a grouping) of the run,
    ``image_size`` (the resolved pre-training image size, which evaluation resizes to),
    ``seed``, ``subset`` (when the run trained on one), ``normalize_mean`` and ``normalize_std``
    (JSON lists: the per-channel statistics its images were normalised with), and ``training``
    (:func:`training_settings` as JSON); entries the config lacks are left out.
    """
    data = config.get("data")
    if not isinstance(data, Mapping):
        return {}
    spec_fields = {field.name for field in dataclasses.fields(DataSpec)}
    spec = DataSpec(**{key: value for key, value in data.items() if key in spec_fields})
    metadata = {
        "dataset": spec.dataset,
        "labels": spec.labels,
        "image_size": str(resolve_image_size(spec)),
    }
    if isinstance(config.get("seed"), int):
        metadata["seed"] = str(config["seed"])
    if spec.subset is not None:  # (runs on 512 and on 1024 images are not seeds of one thing)
        metadata["subset"] = str(spec.subset)
    if spec.dataset in NORMALIZATION:
        # What the backbone's inputs were normalised with: a user outside look needs it.
        mean, std = NORMALIZATION[spec.dataset]
        metadata["normalize_mean"] = json.dumps(list(mean))
        metadata["normalize_std"] = json.dumps(list(std))
    training = training_settings(config)
    if training:
        metadata["training"] = json.dumps(training, sort_keys=True, default=str)
    return metadata


def export_metadata(config: Mapping[str, Any], *, global_step: int | None = None) -> dict[str, str]:
    """What an exported backbone file records besides its weights: the method, the step when
    given, and the pre-training data (:func:`pretraining_metadata`)."""
    metadata = {"method": str(config["method"]["name"])}
    if global_step is not None:
        metadata["global_step"] = str(global_step)
    return {**metadata, **pretraining_metadata(config)}


def export_from_checkpoint(checkpoint: str | Path, output: str | Path) -> Path:
    """Write the backbone of ``checkpoint`` (a run directory or a checkpoint file) to ``output``,
    with the method, the step and the pre-training data (:func:`pretraining_metadata`)."""
    state = load_checkpoint_from(checkpoint)
    model_cfg = state["config"]["model"]
    model_kwargs = model_cfg.get("backbone_kwargs") or {}  # (runs before it existed: none)
    backbone, _ = create_backbone(
        model_cfg["backbone"], small_stem=model_cfg["small_stem"], model_kwargs=model_kwargs
    )
    load_backbone_state(backbone, backbone_state_from_checkpoint(state))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    export_backbone(
        backbone,
        model_cfg["backbone"],
        str(output),
        small_stem=model_cfg["small_stem"],
        model_kwargs=model_kwargs,
        extra_metadata=export_metadata(state["config"], global_step=state["global_step"]),
    )
    return output
