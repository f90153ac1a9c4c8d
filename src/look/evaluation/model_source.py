"""Which network to evaluate: a look checkpoint or export, or any timm/torchvision backbone.

:func:`load_model` turns a :class:`ModelSource` into a :class:`LoadedModel`: the backbone, the
optional projection head, a fingerprint of the weights (for the feature cache) and what is known
about the pre-training run (dataset, labels, image size) for ``results.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from look.data import DataSpec, resolve_image_size
from look.engine.checkpoint import (
    CheckpointCorruptError,
    load_checkpoint,
    load_latest_checkpoint,
    require_look_checkpoint,
)
from look.engine.distributed import is_main_process
from look.engine.export import initial_weights_name, training_settings
from look.models import (
    ProjectionHead,
    check_finite,
    create_backbone,
    load_backbone_state,
    load_exported_backbone,
    read_export_metadata,
)
from look.models.weights import backbone_state_from_checkpoint

__all__ = [
    "FeatureModel",
    "LoadedModel",
    "ModelSource",
    "load_model",
    "state_fingerprint",
]

# State-dict prefixes under which methods keep their projection head (see look.methods).
_HEAD_PREFIXES = ("head.", "projector.")
_HEAD_OPTION_KEYS = ("head_hidden_dim", "head_out_dim", "head_layers", "head_batch_norm")


@dataclass(frozen=True)
class ModelSource:
    """A look checkpoint/export (``checkpoint``) or a timm/torchvision model (``timm``), not both.

    ``checkpoint`` is a run directory (its newest good checkpoint, or its ``backbone.safetensors``
    when it has no checkpoints), a ``ckpt-*.pt`` file or an exported backbone ``.safetensors``.
    ``timm`` is any name :func:`look.models.create_backbone` accepts (``tv:`` for torchvision);
    ``weights`` is a local weight file for it (nothing is ever downloaded), ``small_stem`` adapts
    a ResNet stem to 28–32 px images and ``model_kwargs`` are more constructor arguments (as
    ``model.backbone_kwargs``). Without ``weights`` the model is randomly initialised from the
    evaluation seed.
    """

    checkpoint: str | Path | None = None
    timm: str | None = None
    weights: str | Path | None = None
    small_stem: bool = False
    model_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.timm is None):
            raise ValueError(
                "give exactly one model: a checkpoint (--checkpoint PATH) or a timm/torchvision "
                "name (--timm NAME)"
            )
        if self.checkpoint is not None and (
            self.weights is not None or self.small_stem or self.model_kwargs
        ):
            raise ValueError(
                "--weights, --small-stem and --timm-kwargs go with --timm; a checkpoint already "
                "records its backbone, its constructor arguments, stem and weights"
            )


@dataclass(eq=False)
class LoadedModel:
    """A backbone ready for evaluation and what is known about where it came from.

    ``identity`` is JSON-ready (source, path, backbone name, method, step ...). ``pretraining`` holds
    the pre-training data settings when known (``dataset``, ``labels``, ``image_size``), else None.
    """

    backbone: nn.Module
    feature_dim: int
    backbone_name: str
    small_stem: bool
    identity: dict[str, Any]
    pretraining: dict[str, Any] | None
    head: nn.Module | None = None
    head_dim: int | None = None


class FeatureModel(nn.Module):
    """Frozen-feature extractor: pooled backbone features, or the L2-normalised head embedding.

    With a head this is the embedding ``z = normalize(g(f(x)))`` the pre-training losses see.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)
        if self.head is None:
            return features
        return F.normalize(self.head(features).float(), dim=1)


def state_fingerprint(module: nn.Module) -> str:
    """sha256 over every state-dict entry's name, dtype, shape and bytes (parameters and buffers).

    Any change of a weight or a batch-norm statistic changes it.
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # uint8 view: bytes of any dtype (bf16 has no numpy equivalent).
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def architecture_of(identity: Mapping[str, Any]) -> dict[str, Any]:
    """What built a loaded model's backbone (``LoadedModel.identity``): its name, stem and
    constructor arguments, some of which (a pooling, an activation) its weights do not show."""
    return {
        "backbone": identity.get("backbone"),
        "small_stem": identity.get("small_stem"),
        "model_kwargs": dict(identity.get("model_kwargs") or {}),
    }


def _pretraining_summary(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """Dataset, labels and image size of a pre-training config (a resolved ``RunConfig`` dict)."""
    if not isinstance(config, dict) or not isinstance(config.get("data"), dict):
        return None
    data = config["data"]
    spec_fields = {f.name for f in dataclasses.fields(DataSpec)}
    try:
        spec = DataSpec(**{k: v for k, v in data.items() if k in spec_fields})
        image_size: int | None = resolve_image_size(spec)
    except (TypeError, ValueError, KeyError):
        image_size = data.get("image_size")
    method = config.get("method") if isinstance(config.get("method"), dict) else {}
    return {
        "dataset": data.get("dataset"),
        "labels": data.get("labels"),
        "image_size": image_size,
        "subset": data.get("subset"),
        "method": method.get("name"),
        "seed": config.get("seed"),
        "training": training_settings(config),
    }


def _pretraining_from_export(metadata: dict[str, str]) -> dict[str, Any] | None:
    """What an export's metadata says about its pre-training (see
    :func:`look.engine.export.pretraining_metadata`); None for exports older than those entries."""
    if not any(key in metadata for key in ("dataset", "labels", "image_size")):
        return None
    image_size, seed = metadata.get("image_size", ""), metadata.get("seed", "")
    subset = metadata.get("subset", "")  # (absent: all of the data, or an older export)
    try:  # (exports older than session 20 have no "training" entry)
        training = json.loads(metadata["training"]) if "training" in metadata else None
    except ValueError:
        training = None
    if isinstance(training, dict) and "pretrained_weights" in training:
        # (older exports recorded the whole path; a config read now gives the file's name)
        training["pretrained_weights"] = initial_weights_name(training["pretrained_weights"])
    return {
        "dataset": metadata.get("dataset"),
        "labels": metadata.get("labels"),
        "image_size": int(image_size) if image_size.isdigit() else None,
        "subset": int(subset) if subset.isdigit() else None,
        "method": metadata.get("method"),
        "seed": int(seed) if seed.isdigit() else None,
        "training": training if isinstance(training, dict) else None,
    }


def _disagreements(summary: dict[str, Any] | None, recorded: dict[str, Any] | None) -> list[str]:
    """Where a config's pre-training summary contradicts an export's record (``key: config's
    value vs export's``); nothing to compare for an export that recorded none."""
    if summary is None or recorded is None:
        return []
    return [
        f"{key}: {summary.get(key)!r} vs {recorded[key]!r}"
        for key in ("dataset", "labels", "image_size", "method", "seed", "training")
        if recorded.get(key) is not None and summary.get(key) != recorded[key]
    ]


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], Path]:
    """A checkpoint file, or the newest good one of a run directory: ``(state, file)``."""
    try:
        if path.is_dir():
            loaded = load_latest_checkpoint(path / "checkpoints")
            if loaded is None:
                raise FileNotFoundError(
                    f"no checkpoint in {path / 'checkpoints'} and no backbone.safetensors in {path}; "
                    "pass a run directory of `look pretrain`, a ckpt-*.pt file or an exported "
                    "backbone .safetensors"
                )
            _refuse_an_older_step_of_a_finished_run(path, loaded)
            return require_look_checkpoint(*loaded), loaded[1]
        return require_look_checkpoint(load_checkpoint(path), path), path
    except CheckpointCorruptError as error:
        export = path / "backbone.safetensors"
        instead = (
            f"; its finished backbone, {export}, can be evaluated instead"
            if path.is_dir() and export.is_file()
            else ""
        )
        raise ValueError(f"cannot use checkpoint {path}: {error}{instead}") from error


def _refuse_an_older_step_of_a_finished_run(run: Path, loaded: tuple[dict[str, Any], Path]) -> None:
    """A finished run (its summary.json) whose final checkpoints cannot be read: the newest good
    one is an earlier step, which must not be evaluated as if it were the run's result."""
    try:
        finished = json.loads((run / "summary.json").read_text(encoding="utf-8"))["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # not finished, or no summary to tell
    state, file = loaded
    step = state.get("global_step")
    if isinstance(finished, int) and isinstance(step, int) and step < finished:
        raise ValueError(
            f"{run} finished at step {finished}, but its newest readable checkpoint is "
            f"{file.name} (step {step}): the later ones cannot be read (see the warnings). "
            f"Evaluate the finished backbone, {run / 'backbone.safetensors'}, or that "
            "checkpoint file by name if an earlier step is what you want"
        )


def _head_from_checkpoint(
    state: dict[str, Any], method_cfg: dict[str, Any], feature_dim: int, path: Path
) -> tuple[nn.Module, int]:
    model_state = state["model"]
    method = method_cfg.get("name")
    for prefix in _HEAD_PREFIXES:
        head_state = {
            k.removeprefix(prefix): v for k, v in model_state.items() if k.startswith(prefix)
        }
        if head_state:
            break
    else:
        raise ValueError(
            f"checkpoint {path} (method {method!r}) has no projection head "
            f"(no {' / '.join(p + '*' for p in _HEAD_PREFIXES)} weights); drop --head"
        )
    missing = [k for k in _HEAD_OPTION_KEYS if k not in method_cfg]
    if missing:
        raise ValueError(
            f"checkpoint {path}: method options lack {missing}; cannot rebuild the head"
        )
    head = ProjectionHead(
        feature_dim,
        hidden_dim=int(method_cfg["head_hidden_dim"]),
        out_dim=int(method_cfg["head_out_dim"]),
        num_layers=int(method_cfg["head_layers"]),
        batch_norm=bool(method_cfg["head_batch_norm"]),
    )
    try:
        head.load_state_dict(head_state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"projection head weights in {path} do not fit: {error}") from error
    return head, head.out_dim


def _load_look_checkpoint(path: Path, *, use_head: bool) -> LoadedModel:
    state, file = _read_checkpoint(path)
    config = state["config"]
    model_cfg = config["model"]
    name, small_stem = str(model_cfg["backbone"]), bool(model_cfg.get("small_stem", False))
    backbone, feature_dim = create_backbone(
        name, small_stem=small_stem, model_kwargs=model_cfg.get("backbone_kwargs") or {}
    )
    try:
        load_backbone_state(backbone, backbone_state_from_checkpoint(state), strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"backbone weights in {file} do not fit {name!r} (small_stem={small_stem}): {error}"
        ) from error
    method_cfg = config.get("method") if isinstance(config.get("method"), dict) else {}
    head, head_dim = None, None
    if use_head:
        head, head_dim = _head_from_checkpoint(state, method_cfg, feature_dim, file)
    identity = {
        "source": "checkpoint",
        "path": str(file.resolve()),
        "backbone": name,
        "small_stem": small_stem,
        "model_kwargs": dict(model_cfg.get("backbone_kwargs") or {}),
        "method": method_cfg.get("name"),
        "global_step": state.get("global_step"),
        "look_version": state.get("look_version"),
    }
    return LoadedModel(
        backbone=backbone,
        feature_dim=feature_dim,
        backbone_name=name,
        small_stem=small_stem,
        identity=identity,
        pretraining=_pretraining_summary(config),
        head=head,
        head_dim=head_dim,
    )


def _load_export(path: Path, *, use_head: bool) -> LoadedModel:
    if use_head:
        raise ValueError(
            f"{path} is an exported backbone and holds no projection head; drop --head or pass "
            "the run directory / ckpt-*.pt file"
        )
    try:
        metadata = read_export_metadata(path)
        backbone, feature_dim = load_exported_backbone(path)
    except ValueError as error:
        raise ValueError(f"cannot load {path} as a look export: {error}") from error
    # An export inside a run directory has the run's config next to it; it is used only when
    # it describes this backbone and agrees with what the export recorded of its pre-training
    # (a stray config.yaml, another run's, must not be attributed to the export).
    recorded = _pretraining_from_export(metadata)
    config = None
    config_path = path.parent / "config.yaml"
    if config_path.is_file():
        candidate = yaml.safe_load(config_path.read_text())
        model_cfg = candidate.get("model") if isinstance(candidate, dict) else None
        if isinstance(model_cfg, dict) and model_cfg.get("backbone") == metadata["name"]:
            disagreeing = _disagreements(_pretraining_summary(candidate), recorded)
            if not disagreeing:
                config = candidate
            elif is_main_process():
                warnings.warn(
                    f"{config_path} describes another run than the export {path.name} "
                    f"({'; '.join(disagreeing)}): the export's own record of its pre-training "
                    "is used",
                    RuntimeWarning,
                    stacklevel=3,
                )
    identity = {
        "source": "export",
        "path": str(path.resolve()),
        "backbone": metadata["name"],
        "small_stem": metadata["small_stem"] == "true",
        "model_kwargs": json.loads(metadata.get("model_kwargs", "{}")),
        "method": metadata.get("method"),
        "global_step": int(metadata["global_step"]) if "global_step" in metadata else None,
        "look_version": metadata.get("look_version"),
    }
    return LoadedModel(
        backbone=backbone,
        feature_dim=feature_dim,
        backbone_name=metadata["name"],
        small_stem=metadata["small_stem"] == "true",
        identity=identity,
        # The run's config when it sits beside the export, else what the export recorded.
        pretraining=_pretraining_summary(config) or recorded,
    )


def _load_timm(source: ModelSource, *, use_head: bool, seed: int) -> LoadedModel:
    assert source.timm is not None
    if use_head:
        raise ValueError(
            f"--head needs a look checkpoint with a projection head; {source.timm!r} from "
            "timm/torchvision has none"
        )
    # (a file, a run directory or a look checkpoint: create_backbone reads or refuses it by name)
    if source.weights is not None and not Path(source.weights).exists():
        raise FileNotFoundError(f"--weights {str(source.weights)!r} does not exist")
    # Random initialisation is drawn from the seed, so a random-init baseline is reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            backbone, feature_dim = create_backbone(
                source.timm,
                small_stem=source.small_stem,
                pretrained_weights=source.weights,
                model_kwargs=source.model_kwargs,
            )
        except ValueError as error:
            if source.weights is None:
                raise
            raise ValueError(
                f"cannot load --weights {source.weights} into {source.timm!r} "
                f"(small_stem={source.small_stem}): {error}"
            ) from error
    identity = {
        "source": "timm",
        "backbone": source.timm,
        "small_stem": source.small_stem,
        "model_kwargs": dict(source.model_kwargs or {}),
        "weights": str(Path(source.weights).resolve()) if source.weights is not None else None,
        "initialisation": "weights file" if source.weights is not None else f"random (seed {seed})",
    }
    return LoadedModel(
        backbone=backbone,
        feature_dim=feature_dim,
        backbone_name=source.timm,
        small_stem=source.small_stem,
        identity=identity,
        pretraining=None,
    )


def load_model(source: ModelSource, *, use_head: bool = False, seed: int = 0) -> LoadedModel:
    """Build the backbone (and with ``use_head`` the projection head) that ``source`` names.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` (with the file and the
    reason) for weights that do not fit the architecture, hold NaN or infinite values, or a head
    that does not exist.
    """
    loaded = _load_model(source, use_head=use_head, seed=seed)
    state = dict(loaded.backbone.state_dict())
    if loaded.head is not None:
        state.update({f"head.{k}": v for k, v in loaded.head.state_dict().items()})
    check_finite(state, f"the weights of {source.checkpoint or source.timm}")
    return loaded


def _load_model(source: ModelSource, *, use_head: bool, seed: int) -> LoadedModel:
    if source.timm is not None:
        return _load_timm(source, use_head=use_head, seed=seed)
    path = Path(source.checkpoint).expanduser()  # type: ignore[arg-type]
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist; pass a run directory of `look pretrain`, a "
            "ckpt-*.pt file or an exported backbone .safetensors"
        )
    if path.is_dir() and (path / "backbone.safetensors").is_file():
        has_checkpoints = (path / "checkpoints").is_dir() and any(
            (path / "checkpoints").glob("ckpt-*.pt")
        )
        if not has_checkpoints:
            return _load_export(path / "backbone.safetensors", use_head=use_head)
    if path.is_file() and path.suffix == ".safetensors":
        return _load_export(path, use_head=use_head)
    return _load_look_checkpoint(path, use_head=use_head)
