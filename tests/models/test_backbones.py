"""create_backbone: names, feature dimensions, small stems, errors; count_parameters."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from look.models import apply_small_stem, count_parameters, create_backbone


def pooled(backbone: nn.Module, size: int, channels: int = 3) -> torch.Tensor:
    backbone.eval()
    with torch.no_grad():
        return backbone(torch.randn(2, channels, size, size))


@pytest.mark.parametrize(
    ("name", "small_stem", "size", "expected_dim"),
    [
        ("resnet18", False, 32, 512),
        ("resnet18", False, 28, 512),
        ("resnet18", True, 32, 512),
        ("resnet18", True, 28, 512),
        ("tv:resnet18", False, 32, 512),
        ("tv:resnet18", True, 28, 512),
        ("look_cnn_small", False, 28, 256),
        ("look_cnn_small", True, 32, 256),
        ("look_resnet_tiny", False, 28, 128),
    ],
)
def test_backbone_returns_pooled_features(
    name: str, small_stem: bool, size: int, expected_dim: int
) -> None:
    backbone, feature_dim = create_backbone(name, small_stem=small_stem)
    assert feature_dim == expected_dim
    assert pooled(backbone, size).shape == (2, expected_dim)


@pytest.mark.parametrize("name", ["resnet18", "tv:resnet18"])
def test_small_stem_keeps_resolution_for_small_images(name: str) -> None:
    standard, _ = create_backbone(name)
    small, _ = create_backbone(name, small_stem=True)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    # State-dict keys are the same, so small-stem checkpoints keep the standard layout.
    assert small.state_dict().keys() == standard.state_dict().keys()

    # 32 px through a ResNet: /32 with the standard stem, /8 with the CIFAR-style one.
    def stage4_size(model: nn.Module) -> int:
        captured: list[torch.Tensor] = []
        handle = model.layer4.register_forward_hook(lambda _m, _i, out: captured.append(out))
        pooled(model, 32)
        handle.remove()
        return captured[0].shape[-1]

    assert stage4_size(standard) == 1
    assert stage4_size(small) == 4


def test_small_stem_on_deep_stem_resnet_sets_first_stride_to_one() -> None:
    backbone, _ = create_backbone("resnet18d", small_stem=True)
    assert backbone.conv1[0].stride == (1, 1)
    assert isinstance(backbone.maxpool, nn.Identity)
    assert pooled(backbone, 28).shape == (2, 512)


def test_small_stem_refused_where_there_is_no_resnet_stem() -> None:
    with pytest.raises(ValueError, match="ResNet-like stem"):
        create_backbone("convnext_atto", small_stem=True)
    with pytest.raises(ValueError, match="ResNet-like stem"):
        apply_small_stem(nn.Sequential(nn.Conv2d(3, 4, 3)), "plain")


def test_torchvision_sequential_classifier_keeps_pre_logits() -> None:
    backbone, feature_dim = create_backbone("tv:mobilenet_v3_small")
    # The last Linear (1024 → 1000) goes; the pre-logits Linear (576 → 1024) stays.
    assert feature_dim == 1024
    assert isinstance(backbone.classifier[-1], nn.Identity)
    assert pooled(backbone, 32).shape == (2, 1024)


def test_timm_in_chans() -> None:
    backbone, feature_dim = create_backbone("resnet18", small_stem=True, in_chans=1)
    assert backbone.conv1.in_channels == 1
    assert pooled(backbone, 28, channels=1).shape == (2, feature_dim)


def test_torchvision_in_chans_refused() -> None:
    with pytest.raises(ValueError, match="in_chans=1"):
        create_backbone("tv:resnet18", in_chans=1)


def test_registered_small_nets_build_through_timm() -> None:
    model = timm.create_model("look_cnn_small")
    assert isinstance(model.get_classifier(), nn.Linear)
    assert model.get_classifier().out_features == 1000
    headless = timm.create_model("look_resnet_tiny", num_classes=0)
    assert pooled(headless, 28).shape == (2, 128)
    assert {"look_cnn_small", "look_resnet_tiny"} <= set(timm.list_models("look_*"))


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [("resnet19", "resnet18"), ("tv:resnet81", "tv:resnet18"), ("look_cnn_smal", "look_cnn_small")],
)
def test_unknown_name_suggests_close_matches(name: str, suggestion: str) -> None:
    with pytest.raises(ValueError, match="unknown backbone") as error:
        create_backbone(name)
    assert suggestion in str(error.value)


def test_hub_names_and_empty_names_are_refused() -> None:
    with pytest.raises(ValueError, match="downloads are disabled"):
        create_backbone("hf-hub:timm/resnet18.a1_in1k")
    with pytest.raises(ValueError, match="non-empty"):
        create_backbone("")


def test_a_constructor_argument_without_a_value_is_refused_not_dropped() -> None:
    import yaml

    # "{drop_rate:0.5}" (no space): YAML's key "drop_rate:0.5" with a null value, which timm
    # would drop unread.
    slipped = yaml.safe_load("{drop_rate:0.5}")
    assert slipped == {"drop_rate:0.5": None}
    for name in ("look_cnn_small", "tv:resnet18"):
        with pytest.raises(ValueError, match=r"no value to \['drop_rate:0\.5'\].*a space"):
            create_backbone(name, model_kwargs=slipped)
    # With its value the argument reaches the model.
    backbone, _ = create_backbone("resnet18", model_kwargs=yaml.safe_load("{drop_rate: 0.5}"))
    assert backbone.drop_rate == 0.5


def test_count_parameters() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    assert count_parameters(model) == (3 * 4 + 4) + (4 * 2 + 2)
    model[0].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 4 * 2 + 2
    # A shared layer is counted once.
    shared = nn.Linear(2, 2)
    assert count_parameters(nn.Sequential(shared, shared)) == 6
