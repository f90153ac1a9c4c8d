"""Pre-training methods: one file each, one registry line each."""

from __future__ import annotations

from typing import Any

from torch import nn

from look.config import ConfigError
from look.methods.base import Batch, Method, MethodContext, StepOutput
from look.methods.ce import CrossEntropy
from look.methods.look import LOOK
from look.methods.mocov2 import MoCoV2
from look.methods.nca import NCA
from look.methods.sl_mlp import SupervisedMLP
from look.methods.supcon import SupCon

METHODS: dict[str, type[Method]] = {
    "look": LOOK,
    "nca": NCA,
    "ce": CrossEntropy,
    "sl_mlp": SupervisedMLP,
    "supcon": SupCon,
    "mocov2": MoCoV2,
}


def get_method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def build_method(
    method_cfg: dict[str, Any], backbone: nn.Module, feature_dim: int, ctx: MethodContext
) -> Method:
    """Validate the method section of a config and build the method around ``backbone``."""
    cls = get_method_class(str(method_cfg.get("name")))
    return cls(cls.parse_options(method_cfg), backbone, feature_dim, ctx)


__all__ = [
    "METHODS",
    "Batch",
    "Method",
    "MethodContext",
    "StepOutput",
    "build_method",
    "get_method_class",
]
