"""Small ResNet-style networks for CPU-sized experiments on 28–32 px images.

Both nets are registered in timm's model registry when this module is imported (``import look.models``
does it), so ``timm.create_model("look_cnn_small", num_classes=0)`` builds them like any timm model.
They follow timm's classifier conventions (``num_features``, ``fc``, ``forward_features``,
``forward_head``, ``reset_classifier``) so that the rest of ``look`` never special-cases them.

They are sized for small images already, so ``small_stem`` is a no-op for them: the stem is one 3×3
convolution with stride 2 and no max-pool (a ResNet stem divides the resolution by 4, a CIFAR-style
one by 1). Why stride 2 rather than 1: on 28 px images and 2 CPU cores, a stride-1 stem makes the
full-resolution layers cost 80 % of the time (look_cnn_small: ~390 → ~1900 images/s forward+backward
with stride 2), and in a 1.5-epoch Fashion-MNIST check the strided stem was not less accurate
(82.9 % vs 79.6 % test top-1, one seed). ``SmallResNet(stem_stride=1)`` keeps the full resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.models import register_model
from torch import nn

__all__ = ["SmallResNet", "look_cnn_small", "look_resnet_tiny"]


def _small_net_cfg(**overrides: Any) -> dict[str, Any]:
    """timm pretrained config for our nets: no weights to download, 32 px input."""
    cfg: dict[str, Any] = {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 32, 32),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "stem.conv",
        "classifier": "fc",
    }
    cfg.update(overrides)
    return cfg


# register_model reads the module's ``default_cfgs`` when the decorator runs, so it must come first.
default_cfgs: dict[str, dict[str, Any]] = {
    "look_cnn_small": _small_net_cfg(),
    "look_resnet_tiny": _small_net_cfg(),
}


class ConvBnAct(nn.Sequential):
    """3×3 (or k×k) convolution without bias, batch norm, optional ReLU."""

    def __init__(
        self, in_chs: int, out_chs: int, *, kernel_size: int = 3, stride: int = 1, act: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        )
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 conv-BN layers and a (projected when the shape changes) shortcut."""

    def __init__(self, in_chs: int, out_chs: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = ConvBnAct(in_chs, out_chs, stride=stride)
        self.conv2 = ConvBnAct(out_chs, out_chs, act=False)
        self.shortcut: nn.Module = (
            ConvBnAct(in_chs, out_chs, kernel_size=1, stride=stride, act=False)
            if stride != 1 or in_chs != out_chs
            else nn.Identity()
        )
        self.act = nn.ReLU(inplace=True)

    def zero_init_last(self) -> None:
        # Each block starts as its shortcut: helps short, small-batch training (Goyal et al. 2017).
        nn.init.zeros_(self.conv2.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet with a one-convolution 3×3 stem, ``len(widths)`` stages of basic blocks, average pool.

    The stem has stride ``stem_stride`` (no max-pool); stage 1 keeps the stem's resolution and every
    later stage halves it (28 px with stem stride 2: 14 → 14 → 7 → 4 → 2). With ``num_classes=0`` the
    forward pass returns the pooled ``(B, widths[-1])`` features.
    """

    def __init__(
        self,
        widths: Sequence[int],
        *,
        blocks_per_stage: Sequence[int] | None = None,
        stem_width: int | None = None,
        stem_stride: int = 1,
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_rate: float = 0.0,
        zero_init_last: bool = True,
    ) -> None:
        super().__init__()
        if not widths or any(w <= 0 for w in widths):
            raise ValueError(
                f"widths must be a non-empty list of positive ints, got {list(widths)}"
            )
        blocks = list(blocks_per_stage) if blocks_per_stage is not None else [1] * len(widths)
        if len(blocks) != len(widths) or any(b < 1 for b in blocks):
            raise ValueError(
                f"blocks_per_stage must give one count >= 1 per stage ({len(widths)} stages), got {blocks}"
            )
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        if num_classes < 0:
            raise ValueError(
                f"num_classes must be >= 0 (0 removes the classifier), got {num_classes}"
            )

        stem_width = stem_width or widths[0]
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        self.stem = ConvBnAct(in_chans, stem_width, stride=stem_stride)
        stages: list[nn.Module] = []
        in_chs = stem_width
        for stage_index, (width, num_blocks) in enumerate(zip(widths, blocks, strict=True)):
            stage_blocks = []
            for block_index in range(num_blocks):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                stage_blocks.append(BasicBlock(in_chs, width, stride=stride))
                in_chs = width
            stages.append(nn.Sequential(*stage_blocks))
        self.stages = nn.Sequential(*stages)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_chs
        self.drop_rate = drop_rate
        self.num_classes = num_classes
        self.fc: nn.Module = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            {"num_chs": w, "reduction": stem_stride * 2**i, "module": f"stages.{i}"}
            for i, w in enumerate(widths)
        ]
        self._init_weights(zero_init_last=zero_init_last)

    def _init_weights(self, *, zero_init_last: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        if zero_init_last:
            for module in self.modules():
                if isinstance(module, BasicBlock):
                    module.zero_init_last()

    def get_classifier(self) -> nn.Module:
        """The final linear layer (``nn.Identity`` when ``num_classes == 0``)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (0: none)."""
        if global_pool != "avg":
            raise ValueError(f"SmallResNet only supports global_pool='avg', got {global_pool!r}")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled feature map ``(B, num_features, H', W')``."""
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool (then dropout and classifier unless ``pre_logits``)."""
        x = self.global_pool(x).flatten(1)
        if self.drop_rate > 0.0:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_small_resnet(
    variant: str,
    widths: Sequence[int],
    *,
    pretrained: bool = False,
    pretrained_cfg: Any = None,
    pretrained_cfg_overlay: Any = None,
    cache_dir: Any = None,
    **kwargs: Any,
) -> SmallResNet:
    # timm.create_model passes these through to every entrypoint; our nets have no published weights.
    del pretrained_cfg, pretrained_cfg_overlay, cache_dir
    if pretrained:
        raise ValueError(
            f"{variant} has no published pretrained weights; use "
            "look.models.create_backbone(..., pretrained_weights='path/to/file.safetensors')"
        )
    # timm training scripts pass it; the nets have no stochastic depth.
    kwargs.pop("drop_path_rate", None)
    model = SmallResNet(widths, **kwargs)
    model.pretrained_cfg = dict(default_cfgs[variant], architecture=variant)
    model.default_cfg = model.pretrained_cfg
    return model


@register_model
def look_cnn_small(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """Compact ResNet-10-style CNN: 3×3 stride-2 stem (32 ch), stages 32-64-128-256 of one basic
    block each (stride 2 in stages 2–4) → 256-d features. ~1.2 M parameters."""
    kwargs.setdefault("stem_stride", 2)
    return _create_small_resnet(
        "look_cnn_small", (32, 64, 128, 256), pretrained=pretrained, **kwargs
    )


@register_model
def look_resnet_tiny(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """Narrow ResNet-10-style net: 3×3 stride-2 stem (16 ch), stages 16-32-64-128 of one basic block
    each (stride 2 in stages 2–4) → 128-d features. ~0.3 M parameters."""
    kwargs.setdefault("stem_stride", 2)
    return _create_small_resnet(
        "look_resnet_tiny", (16, 32, 64, 128), pretrained=pretrained, **kwargs
    )
