"""ProjectionHead and build_projection_head."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from look.models import ProjectionHead, build_projection_head


def layer_types(head: ProjectionHead) -> list[type]:
    return [type(m) for m in head.layers]


def test_default_head_is_linear_bn_relu_linear() -> None:
    head = ProjectionHead(512)
    assert layer_types(head) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head.layers[0].bias is None  # batch norm supplies the shift
    assert head(torch.randn(4, 512)).shape == (4, 128)


def test_depth_and_batch_norm_options() -> None:
    assert layer_types(ProjectionHead(16, out_dim=8, num_layers=1)) == [nn.Linear]
    deep = ProjectionHead(16, hidden_dim=32, out_dim=8, num_layers=3, batch_norm=False)
    assert layer_types(deep) == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert deep.layers[0].bias is not None
    assert deep(torch.randn(3, 16)).shape == (3, 8)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_dim": 0},
        {"in_dim": 8, "hidden_dim": -1},
        {"in_dim": 8, "out_dim": 2.5},
        {"in_dim": 8, "num_layers": 0},
        {"in_dim": 8, "num_layers": True},
        {"in_dim": 8, "batch_norm": "yes"},
    ],
)
def test_invalid_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ProjectionHead(**kwargs)


def test_wrong_feature_width_is_reported() -> None:
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        ProjectionHead(8, hidden_dim=4, out_dim=2)(torch.randn(2, 9))


def test_build_from_mapping_dataclass_and_kwargs() -> None:
    head = build_projection_head({"hidden_dim": 64, "out_dim": 16}, in_dim=32)
    assert (head.in_dim, head.hidden_dim, head.out_dim, head.num_layers) == (32, 64, 16, 2)

    @dataclass
    class HeadConfig:
        hidden_dim: int = 8
        out_dim: int = 4
        num_layers: int = 3

    head = build_projection_head(HeadConfig(), in_dim=6, out_dim=5)
    assert (head.hidden_dim, head.out_dim, head.num_layers) == (8, 5, 3)
    assert build_projection_head(in_dim=10).out_dim == 128


def test_build_rejects_unknown_and_missing_options() -> None:
    with pytest.raises(ValueError, match="hiden_dim"):
        build_projection_head({"hiden_dim": 64}, in_dim=8)
    with pytest.raises(ValueError, match="in_dim"):
        build_projection_head({"hidden_dim": 64})
    with pytest.raises(ValueError, match="mapping or a dataclass"):
        build_projection_head([("in_dim", 8)])
