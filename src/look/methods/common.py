"""Pieces several methods share: projection-head options, embedding, momentum (EMA) updates."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from look.methods.base import check_options
from look.models import ProjectionHead


@dataclass
class HeadOptions:
    """Projection head g: MLP on top of the pooled backbone features (METHOD.md defaults)."""

    head_hidden_dim: int = 2048
    head_out_dim: int = 128
    head_layers: int = 2
    head_batch_norm: bool = True

    def validate_head(self) -> None:
        for name in ("head_hidden_dim", "head_out_dim", "head_layers"):
            value = getattr(self, name)
            check_options(value >= 1, f"{name} must be >= 1, got {value}")

    def build_head(self, in_dim: int) -> nn.Module:
        return ProjectionHead(
            in_dim,
            hidden_dim=self.head_hidden_dim,
            out_dim=self.head_out_dim,
            num_layers=self.head_layers,
            batch_norm=self.head_batch_norm,
        )


def embed(backbone: nn.Module, head: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``normalize(g(f(x)))`` in fp32, whatever precision autocast ran the network in."""
    return F.normalize(head(backbone(images)).float(), dim=1)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy for a momentum encoder: same weights, no gradients (so DDP ignores it)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """θ_target ← m θ_target + (1 − m) θ_online, parameters only (BN statistics stay the target's)."""
    for p_online, p_target in zip(online.parameters(), target.parameters(), strict=True):
        p_target.lerp_(p_online.detach(), 1.0 - momentum)
