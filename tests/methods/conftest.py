from __future__ import annotations

import torch
from torch import nn

from look.methods import Batch, MethodContext


class TinyBackbone(nn.Module):
    """A backbone without batch-norm, so one process and several ranks compute the same thing."""

    def __init__(self, feature_dim: int = 12) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, feature_dim, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.conv(x))).flatten(1)


def make_batch(
    batch_size: int, num_views: int, *, num_classes: int, seed: int, offset: int = 0
) -> Batch:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch_size, 3, 8, 8, generator=g) for _ in range(num_views)]
    labels = torch.randint(0, num_classes, (batch_size,), generator=g)
    indices = torch.arange(offset, offset + batch_size)
    return Batch(views=views, labels=labels, indices=indices)


CTX = MethodContext(num_classes=3, num_samples=64)
SMALL_HEAD = {"head_hidden_dim": 16, "head_out_dim": 8}
