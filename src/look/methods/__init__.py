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


# Methods of other packages register under this entry-point group (in their pyproject.toml:
# [project.entry-points."look.methods"] my_method = "my_package.my_method:MyMethod"), so that
# `look pretrain` and `torchrun -m look` find them without an edit of look.
ENTRY_POINT_GROUP = "look.methods"


def registered_methods() -> dict[str, type[Method]]:
    """The built-in methods and those other installed packages register (entry points)."""
    from importlib.metadata import entry_points

    found = dict(METHODS)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in found:
            continue  # a built-in (or an earlier registration) keeps its name
        try:
            cls = entry.load()
        except Exception as error:  # a broken plug-in must not stop the built-in methods
            raise ConfigError(
                f"method {entry.name!r} registered by entry point {entry.value!r} cannot be "
                f"loaded: {type(error).__name__}: {error}"
            ) from error
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise ConfigError(
                f"entry point {entry.name!r} = {entry.value!r} is not a look.methods.Method"
            )
        found[entry.name] = cls
    return found


def get_method_class(name: str) -> type[Method]:
    if name in METHODS:
        return METHODS[name]
    methods = registered_methods()
    if name not in methods:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(methods)}")
    return methods[name]


def build_method(
    method_cfg: dict[str, Any], backbone: nn.Module, feature_dim: int, ctx: MethodContext
) -> Method:
    """Validate the method section of a config and build the method around ``backbone``."""
    cls = get_method_class(str(method_cfg.get("name")))
    return cls(cls.parse_options(method_cfg), backbone, feature_dim, ctx)


__all__ = [
    "ENTRY_POINT_GROUP",
    "LOOK",
    "METHODS",
    "NCA",
    "Batch",
    "CrossEntropy",
    "Method",
    "MethodContext",
    "MoCoV2",
    "StepOutput",
    "SupCon",
    "SupervisedMLP",
    "build_method",
    "get_method_class",
    "registered_methods",
]
