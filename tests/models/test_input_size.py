"""Images too small for a backbone: one ValueError naming it, its size and the settings to change,
raised before the real forward runs; other errors keep torch's own message."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from look.models import create_backbone


def test_too_small_images_name_backbone_size_and_settings_before_the_forward() -> None:
    # convnext_atto's stem and three 2×2 downsamplings need 32 px; Fashion-MNIST has 28.
    backbone, _ = create_backbone("convnext_atto", in_chans=1)
    stem_calls: list[torch.Size] = []
    backbone.stem.register_forward_hook(lambda _m, _i, out: stem_calls.append(out.shape))
    buffers = {k: v.clone() for k, v in backbone.state_dict().items()}
    rng = torch.get_rng_state()

    with pytest.raises(ValueError) as caught:
        backbone(torch.zeros(2, 1, 28, 28))

    message = str(caught.value)
    assert "'convnext_atto'" in message and "28 px" in message and "32×32 px" in message
    assert "data.image_size=32" in message and "--image-size 32" in message
    assert "small_stem" not in message  # ConvNeXt has no ResNet stem to adapt
    # torch's own error is chained, not lost.
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert "Kernel size can't be greater than actual input size" in str(caught.value.__cause__)
    # The probe ran nothing real and left no trace: no layer (nor a caller's hook) saw it, the
    # weights, statistics, training modes and random state are as they were.
    assert stem_calls == []
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in buffers.items())
    assert all(m.training for m in backbone.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    # A copy (a momentum encoder, a fine-tuned copy) keeps the check.
    with pytest.raises(ValueError, match="too small"):
        copy.deepcopy(backbone)(torch.zeros(1, 1, 28, 28))

    assert backbone(torch.zeros(2, 1, 32, 32)).shape == (2, 320)
    assert len(stem_calls) == 1


def test_create_backbone_checks_a_given_image_size_at_build_time() -> None:
    with pytest.raises(ValueError, match=r"'convnext_atto' cannot take 28 px images"):
        create_backbone("convnext_atto", in_chans=1, image_size=28)
    create_backbone("convnext_atto", in_chans=1, image_size=32)


@pytest.mark.parametrize("size", [16, 64])
def test_other_errors_keep_torchs_message(size: int) -> None:
    # Three-channel images for a one-channel net fail at every size: not a size problem.
    backbone, _ = create_backbone("look_cnn_small", in_chans=1)
    with pytest.raises(RuntimeError, match=r"expected input.* to have 1 channels"):
        backbone(torch.zeros(2, 3, size, size))


class _ResNetLike(nn.Module):
    """A ResNet stem (7×7/2 conv, 3×3/2 max-pool) and an unpadded 5×5 convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, stride=2, padding=3)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.body = nn.Conv2d(8, 8, 5)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(self.maxpool(self.conv1(x)))).flatten(1)


def test_small_stem_is_suggested_where_the_backbone_supports_it() -> None:
    from look.models import apply_small_stem
    from look.models.backbones import _small_stem_problem
    from look.models.input_size import InputSizeCheck, install_input_size_check

    model = _ResNetLike()
    assert _small_stem_problem(model, "toy") is None
    install_input_size_check(
        model,
        InputSizeCheck(
            "toy", architecture=None, in_chans=3, small_stem=False, small_stem_supported=True
        ),
    )
    with pytest.raises(ValueError) as caught:
        model(torch.zeros(1, 3, 8, 8))
    message = str(caught.value)
    assert "'toy' cannot take 8 px images" in message and "17×17 px" in message
    assert "model.small_stem=true" in message and "--small-stem" in message
    # The advice holds: with the small stem the same images pass.
    apply_small_stem(model, "toy")
    assert model(torch.zeros(1, 3, 8, 8)).shape == (1, 8)


def test_a_vit_given_another_size_keeps_its_own_message() -> None:
    # 224 px passes and 28 px fails, but so does 225 px: a fixed size, not a minimum one.
    backbone, _ = create_backbone("vit_tiny_patch16_224")
    with pytest.raises(AssertionError, match=r"Input height \(28\) doesn't match model \(224\)"):
        backbone(torch.zeros(1, 3, 28, 28))


class _SizeRange(nn.Module):
    """Takes 20 to 24 px only (as MaxViT takes 221 to 224 px): not a minimum size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not 20 <= x.shape[-1] <= 24:
            raise RuntimeError(f"shape {tuple(x.shape)} is invalid")
        return x.mean((2, 3))


def test_a_range_of_sizes_is_not_reported_as_a_minimum() -> None:
    from look.models.input_size import InputSizeCheck, install_input_size_check

    model = _SizeRange()
    install_input_size_check(
        model,
        InputSizeCheck(
            "range", architecture=None, in_chans=3, small_stem=False, small_stem_supported=False
        ),
    )
    with pytest.raises(RuntimeError, match=r"shape \(1, 3, 12, 12\) is invalid"):
        model(torch.zeros(1, 3, 12, 12))
