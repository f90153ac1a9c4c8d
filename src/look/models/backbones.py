"""Backbones: timm and torchvision models (and our small nets) with the classifier removed.

``create_backbone(name)`` returns a module mapping images ``(B, C, H, W)`` to pooled features
``(B, feature_dim)``. Names are timm model names (our small nets are registered there too) or
torchvision names with a ``tv:`` prefix. Weights are never downloaded: ``pretrained_weights`` takes a
local file.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torchvision
from timm.models import split_model_name_tag
from torch import nn

from look.models.input_size import InputSizeCheck, check_input_size, install_input_size_check
from look.models.small_nets import SmallResNet
from look.models.weights import load_backbone_weights

__all__ = [
    "TORCHVISION_PREFIX",
    "apply_small_stem",
    "count_parameters",
    "create_backbone",
    "list_backbone_names",
]

TORCHVISION_PREFIX = "tv:"
# Constructor arguments look sets itself (no downloaded weights, no classifier).
_RESERVED_MODEL_KWARGS = frozenset({"pretrained", "num_classes", "in_chans", "weights"})
# Attributes that hold the classifier of torchvision classification models.
_TORCHVISION_CLASSIFIER_ATTRIBUTES = ("fc", "classifier", "heads", "head")
# With weights=None these build auxiliary classifiers whose outputs change forward()'s return type.
_TORCHVISION_NO_AUX: dict[str, dict[str, bool]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
# The auxiliary classifiers those leave out, which torchvision's published weights carry: a weight
# file's keys under them are ignored like the final classifier's.
_TORCHVISION_AUX_CLASSIFIERS: dict[str, tuple[str, ...]] = {
    "googlenet": ("aux1", "aux2"),
    "inception_v3": ("AuxLogits",),
}


def _torchvision_classification_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_backbone_names() -> list[str]:
    """Every name :func:`create_backbone` accepts: timm names, then ``tv:``-prefixed torchvision ones."""
    timm_names = list(timm.list_models())
    return timm_names + [TORCHVISION_PREFIX + n for n in _torchvision_classification_names()]


def _unknown_name_error(name: str, candidates: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ValueError(
        f"unknown backbone {name!r}: not a timm model name nor '{TORCHVISION_PREFIX}<torchvision "
        f"name>'.{hint} See look.models.list_backbone_names()."
    )


def _remove_torchvision_classifier(model: nn.Module, name: str) -> tuple[int, str]:
    """Replace the final ``nn.Linear`` of the classifier by ``nn.Identity``.

    Returns the feature dimension (the removed layer's ``in_features``) and the state-dict prefix of
    the removed layer. Only the last linear layer goes: what precedes it inside a ``Sequential``
    classifier (ConvNeXt's norm and flatten, MobileNetV3's pre-logits layer) is part of the pooled
    feature computation.
    """
    for attribute in _TORCHVISION_CLASSIFIER_ATTRIBUTES:
        classifier = getattr(model, attribute, None)
        if isinstance(classifier, nn.Linear):
            setattr(model, attribute, nn.Identity())
            return classifier.in_features, attribute
        if isinstance(classifier, nn.Sequential):
            children = list(classifier.named_children())
            linear_positions = [i for i, (_, m) in enumerate(children) if isinstance(m, nn.Linear)]
            if not linear_positions:
                break
            last = linear_positions[-1]
            trailing_parameters = [
                p for _, m in children[last + 1 :] for p in m.parameters(recurse=True)
            ]
            if trailing_parameters:
                break
            child_name, linear = children[last]
            setattr(classifier, child_name, nn.Identity())
            return linear.in_features, f"{attribute}.{child_name}"
    raise ValueError(
        f"cannot remove the classifier of torchvision model {name!r}: it has no linear classifier "
        f"under {list(_TORCHVISION_CLASSIFIER_ATTRIBUTES)}. Use a timm name instead."
    )


def _small_stem_problem(model: nn.Module, label: str) -> str | None:
    """Why :func:`apply_small_stem` cannot adapt ``model`` (None: it can)."""
    stem_conv = getattr(model, "conv1", None)
    max_pool = getattr(model, "maxpool", None)
    if not isinstance(stem_conv, nn.Conv2d | nn.Sequential) or not isinstance(max_pool, nn.Module):
        return (
            f"small_stem=True needs a ResNet-like stem (a 'conv1' convolution and a 'maxpool'); "
            f"{label!r} ({type(model).__name__}) has none. Use a ResNet (e.g. 'resnet18', "
            "'tv:resnet18') or a small net ('look_cnn_small', 'look_resnet_tiny'), or small_stem=False."
        )
    if max_pool.state_dict():
        return (
            f"small_stem=True cannot remove the max-pool of {label!r}: it is a learned downsampling "
            "layer. Use a ResNet with a plain max-pool (e.g. 'resnet18') or small_stem=False."
        )
    return None


def apply_small_stem(model: nn.Module, name: str = "") -> None:
    """Adapt a ResNet-like stem in place for 28–32 px images (CIFAR style).

    The stem convolution becomes 3×3 with stride 1 (a deep stem keeps its layers, its first
    convolution gets stride 1) and the max-pool is removed, so a 32 px image reaches the first stage
    at 32 px instead of 8 px. State-dict keys are unchanged (only conv1's shape changes). Our small
    nets (``look_cnn_small``, ``look_resnet_tiny``) are sized for small images already (3×3
    stride-2 stem, no max-pool) and are left as they are. Raises ``ValueError`` for architectures
    without a ``conv1``/``maxpool`` stem.
    """
    if isinstance(model, SmallResNet):
        return
    label = name or type(model).__name__
    problem = _small_stem_problem(model, label)
    if problem is not None:
        raise ValueError(problem)
    stem_conv = model.conv1
    if isinstance(stem_conv, nn.Conv2d):
        small_conv = nn.Conv2d(
            stem_conv.in_channels,
            stem_conv.out_channels,
            kernel_size=3,
            stride=1,
            padding=1,
            bias=stem_conv.bias is not None,
        )
        nn.init.kaiming_normal_(small_conv.weight, mode="fan_out", nonlinearity="relu")
        model.conv1 = small_conv
    else:
        first_conv = next((m for m in stem_conv.modules() if isinstance(m, nn.Conv2d)), None)
        if first_conv is None:
            raise ValueError(f"small_stem=True: the deep stem of {label!r} has no convolution")
        first_conv.stride = (1, 1)
    model.maxpool = nn.Identity()


def _create_torchvision(
    name: str, *, in_chans: int, model_kwargs: Mapping[str, Any]
) -> tuple[nn.Module, int, tuple[str, ...]]:
    tv_name = name.removeprefix(TORCHVISION_PREFIX)
    tv_names = _torchvision_classification_names()
    if tv_name not in tv_names:
        raise _unknown_name_error(name, [TORCHVISION_PREFIX + n for n in tv_names])
    if in_chans != 3:
        raise ValueError(
            f"in_chans={in_chans} is not supported for torchvision models ({name!r}); "
            "use a timm name (they take in_chans) or 3-channel images"
        )
    model = _construct(
        name,
        lambda: torchvision.models.get_model(
            tv_name, weights=None, **{**_TORCHVISION_NO_AUX.get(tv_name, {}), **model_kwargs}
        ),
        model_kwargs,
    )
    feature_dim, classifier_prefix = _remove_torchvision_classifier(model, name)
    return model, feature_dim, (classifier_prefix, *_TORCHVISION_AUX_CLASSIFIERS.get(tv_name, ()))


def _construct(name: str, build: Any, model_kwargs: Mapping[str, Any]) -> nn.Module:
    """``build()``, with a constructor's refusal of ``model_kwargs`` said in config terms."""
    try:
        return build()
    except TypeError as error:
        if not model_kwargs:
            raise
        raise ValueError(
            f"{name!r} does not take the constructor arguments model.backbone_kwargs="
            f"{dict(model_kwargs)}: {error}"
        ) from error


def _create_timm(
    name: str, *, in_chans: int, model_kwargs: Mapping[str, Any]
) -> tuple[nn.Module, int, tuple[str, ...]]:
    if ":" in name:
        raise ValueError(
            f"backbone {name!r} names a hub source; downloads are disabled. Use a plain timm name and "
            "pass a local file as pretrained_weights"
        )
    architecture, _ = split_model_name_tag(name)
    if not timm.is_model(architecture):
        raise _unknown_name_error(name, list_backbone_names())
    model = _construct(
        name,
        lambda: timm.create_model(
            name, pretrained=False, num_classes=0, in_chans=in_chans, **model_kwargs
        ),
        model_kwargs,
    )
    # Models with a pre-logits layer report its width as head_hidden_size (timm >= 1.0).
    feature_dim = getattr(model, "head_hidden_size", None) or model.num_features
    # The classifier's module path(s), e.g. "fc" or "head.fc", or a tuple for distilled models.
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "fc"
    prefixes = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return model, int(feature_dim), prefixes


def create_backbone(
    name: str,
    *,
    small_stem: bool = False,
    pretrained_weights: str | Path | None = None,
    in_chans: int = 3,
    model_kwargs: Mapping[str, Any] | None = None,
    image_size: int | None = None,
) -> tuple[nn.Module, int]:
    """Build a backbone mapping ``(B, in_chans, H, W)`` images to pooled ``(B, feature_dim)`` features.

    Args:
        name: a timm model name (``"resnet18"``, ``"look_cnn_small"``) or a torchvision classification
            model name prefixed with ``"tv:"`` (``"tv:resnet18"``). Built without pretrained weights.
        small_stem: replace a ResNet stem by a CIFAR-style one for 28–32 px images
            (see :func:`apply_small_stem`).
        pretrained_weights: a local ``.safetensors`` or ``.pth``/``.pt`` file, a ``look pretrain``
            run directory (its ``backbone.safetensors``) or checkpoint (its online backbone), loaded
            with :func:`look.models.load_backbone_weights` (prefixes ``module.``/``backbone.``/
            ``encoder.`` stripped where a key does not fit as it is; classifier keys, and the
            auxiliary classifiers of ``tv:googlenet``/``tv:inception_v3``, ignored; anything else
            that does not match raises).
        in_chans: input channels (timm models and small nets only).
        model_kwargs: more constructor arguments (``model.backbone_kwargs``), e.g.
            ``{"img_size": 32, "patch_size": 4}`` for a timm ViT on small images; not
            ``pretrained``, ``num_classes``, ``in_chans`` nor ``weights``, which look sets.
        image_size: when given, check now that ``image_size`` px images are not too small for
            the backbone (see below) instead of at its first forward.

    Returns:
        ``(backbone, feature_dim)``; the backbone is in training mode. Its attribute
        ``pretrained_weights_summary`` is one line saying what was loaded (``"loaded 62 tensors
        from FILE (ignored: fc.bias, fc.weight)"``), or None without ``pretrained_weights``.
        Its forward raises ``ValueError`` naming the backbone, the image size and the settings
        to change when images are too small for it (a probe on the meta device, once per input
        shape: :class:`look.models.input_size.InputSizeCheck`), instead of torch's error from
        deep inside a layer.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone name must be a non-empty string, got {name!r}")
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    model_kwargs = dict(model_kwargs or {})
    # timm drops null arguments unread, and YAML reads `{drop_rate:0.5}` (no space) as the key
    # "drop_rate:0.5" with a null value: the model would silently be built without it.
    nulls = sorted(str(key) for key, value in model_kwargs.items() if value is None)
    if nulls:
        raise ValueError(
            f"model.backbone_kwargs (look evaluate: --timm-kwargs) gives no value to {nulls}: "
            "a null argument is not passed "
            "to the constructor (YAML reads '{drop_rate:0.5}' as a key 'drop_rate:0.5' without "
            "a value; write '{drop_rate: 0.5}', with a space after the colon)"
        )
    reserved = sorted(set(model_kwargs) & _RESERVED_MODEL_KWARGS)
    if reserved:
        raise ValueError(
            f"model.backbone_kwargs may not set {reserved}: look sets them (weights come from "
            "model.pretrained_weights, and the classifier is removed)"
        )
    if name.startswith(TORCHVISION_PREFIX):
        model, feature_dim, classifier = _create_torchvision(
            name, in_chans=in_chans, model_kwargs=model_kwargs
        )
    else:
        model, feature_dim, classifier = _create_timm(
            name, in_chans=in_chans, model_kwargs=model_kwargs
        )
    if small_stem:
        apply_small_stem(model, name)
    install_input_size_check(
        model,
        InputSizeCheck(
            name,
            # Everything the layers' geometry depends on: probe results are shared by this key.
            architecture=repr((name, small_stem, in_chans, sorted(model_kwargs.items()))),
            in_chans=in_chans,
            small_stem=small_stem,
            small_stem_supported=not isinstance(model, SmallResNet)
            and _small_stem_problem(model, name) is None,
        ),
    )
    if image_size is not None:
        check_input_size(model, image_size, in_chans=in_chans)
    # Recorded on the module (create_backbone returns only it and its width), so callers such as
    # the trainer's plan can tell the user whether weights were loaded; None means random init.
    model.pretrained_weights_summary = None
    if pretrained_weights is not None:
        report = load_backbone_weights(model, pretrained_weights, classifier_prefixes=classifier)
        model.pretrained_weights_summary = report.summary
    return model, feature_dim


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
