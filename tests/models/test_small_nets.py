"""The small ResNets registered in timm: structure, timm-style classifier API, argument checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from look.models import SmallResNet, create_backbone, look_cnn_small, look_resnet_tiny


@pytest.mark.parametrize(("factory", "width"), [(look_cnn_small, 256), (look_resnet_tiny, 128)])
@pytest.mark.parametrize("size", [28, 32])
def test_small_net_shapes(factory, width: int, size: int) -> None:
    model = factory(num_classes=10).eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert model(images).shape == (2, 10)
        features = model.forward_head(model.forward_features(images), pre_logits=True)
    assert model.num_features == width
    assert features.shape == (2, width)


def test_stem_stride_halves_the_feature_map() -> None:
    images = torch.randn(1, 3, 28, 28)
    full = SmallResNet((8, 16), num_classes=0).eval()
    strided = SmallResNet((8, 16), stem_stride=2, num_classes=0).eval()
    with torch.no_grad():
        assert full.forward_features(images).shape[-1] == 14
        assert strided.forward_features(images).shape[-1] == 7
    assert strided.feature_info[-1]["reduction"] == 4


def test_reset_classifier_and_backward() -> None:
    model = SmallResNet((8, 16), blocks_per_stage=(2, 1), num_classes=0)
    assert isinstance(model.get_classifier(), nn.Identity)
    model.reset_classifier(5)
    logits = model(torch.randn(4, 3, 16, 16))
    assert logits.shape == (4, 5)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_pretrained_request_is_refused() -> None:
    with pytest.raises(ValueError, match="no published pretrained weights"):
        look_cnn_small(pretrained=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"widths": ()},
        {"widths": (8, 0)},
        {"widths": (8, 16), "blocks_per_stage": (1,)},
        {"widths": (8,), "stem_stride": 3},
        {"widths": (8,), "in_chans": 0},
        {"widths": (8,), "num_classes": -1},
    ],
)
def test_invalid_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SmallResNet(**kwargs)


def test_registered_nets_use_a_strided_stem_that_small_stem_leaves_alone() -> None:
    for small_stem in (False, True):
        backbone, _ = create_backbone("look_cnn_small", small_stem=small_stem)
        assert backbone.stem.conv.stride == (2, 2)
    assert look_resnet_tiny().stem.conv.stride == (2, 2)
    assert look_cnn_small(stem_stride=1).stem.conv.stride == (1, 1)
