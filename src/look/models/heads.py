"""Projection heads: the MLP ``g`` between pooled backbone features and the embedding space."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["ProjectionHead", "build_projection_head"]


def _check_positive_int(value: object, argument: str) -> int:
    # bool is an int subclass; True as a width is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument} must be a positive int, got {value!r}")
    return value


class ProjectionHead(nn.Module):
    """MLP ``(Linear → BatchNorm1d → ReLU) × (num_layers − 1) → Linear``.

    ``num_layers=1`` is a single linear layer. Hidden linear layers drop their bias when followed by
    batch norm (the norm's shift replaces it). The output is not normalised: callers L2-normalise.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        num_layers: int = 2,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.in_dim = _check_positive_int(in_dim, "in_dim")
        self.hidden_dim = _check_positive_int(hidden_dim, "hidden_dim")
        self.out_dim = _check_positive_int(out_dim, "out_dim")
        self.num_layers = _check_positive_int(num_layers, "num_layers")
        if not isinstance(batch_norm, bool):
            raise ValueError(f"batch_norm must be a bool, got {batch_norm!r}")
        self.batch_norm = batch_norm

        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(width, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            width = hidden_dim
        layers.append(nn.Linear(width, out_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.in_dim:
            raise ValueError(
                f"ProjectionHead expects (B, {self.in_dim}) features, got {tuple(features.shape)}"
            )
        return self.layers(features)

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, hidden_dim={self.hidden_dim}, out_dim={self.out_dim}, "
            f"num_layers={self.num_layers}, batch_norm={self.batch_norm}"
        )


_HEAD_ARGUMENTS = ("in_dim", "hidden_dim", "out_dim", "num_layers", "batch_norm")


def build_projection_head(
    config: Mapping[str, Any] | Any | None = None, /, **kwargs: Any
) -> ProjectionHead:
    """Build a :class:`ProjectionHead` from a mapping or dataclass config and/or keyword arguments.

    Keyword arguments override the config, e.g. ``build_projection_head(cfg.head, in_dim=512)``.
    Unknown keys raise ``ValueError`` (a typo must not silently fall back to a default).
    """
    if config is None:
        options: dict[str, Any] = {}
    elif isinstance(config, Mapping):
        options = dict(config)
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        options = dataclasses.asdict(config)
    else:
        raise ValueError(
            f"projection head config must be a mapping or a dataclass instance, got {type(config).__name__}"
        )
    options.update(kwargs)
    unknown = sorted(set(options) - set(_HEAD_ARGUMENTS))
    if unknown:
        raise ValueError(
            f"unknown projection head option(s) {unknown}; allowed: {list(_HEAD_ARGUMENTS)}"
        )
    if "in_dim" not in options:
        raise ValueError("build_projection_head needs in_dim (the backbone's feature_dim)")
    return ProjectionHead(**options)
