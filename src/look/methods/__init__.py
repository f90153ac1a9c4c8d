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


def _load_plugin(entry: Any) -> type[Method]:
    """The method class an entry point names, checked: a ConfigError names what is wrong."""
    import dataclasses

    try:
        cls = entry.load()
    except Exception as error:
        raise ConfigError(
            f"method {entry.name!r} registered by entry point {entry.value!r} cannot be "
            f"loaded: {type(error).__name__}: {error}"
        ) from error
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(
            f"entry point {entry.name!r} = {entry.value!r} is not a look.methods.Method"
        )
    if cls.name != entry.name:
        # Runs record the class's name: another one could not be trained again from config.yaml.
        raise ConfigError(
            f"method class {entry.value!r} has name {cls.name!r} but is registered as "
            f"{entry.name!r}: set name = {entry.name!r} on the class"
        )
    if not (isinstance(cls.Options, type) and dataclasses.is_dataclass(cls.Options)):
        raise ConfigError(
            f"method {entry.name!r} ({entry.value}) has no Options dataclass: set "
            "Options = a @dataclass of its options, each with a default (an empty one if none)"
        )
    return cls


def registered_methods(*, broken: list[str] | None = None) -> dict[str, type[Method]]:
    """The built-in methods and those other installed packages register (entry points).

    A plug-in that cannot be loaded is left out, its error appended to ``broken`` (raised
    instead when ``broken`` is None), so that one broken package stops none of the others; a
    plug-in registered under a built-in's name is left out with a warning."""
    import warnings
    from importlib.metadata import entry_points

    found = dict(METHODS)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in found:
            warnings.warn(
                f"entry point {entry.name!r} = {entry.value!r} is left out: the name is taken "
                "by a built-in method (or an earlier registration)",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        try:
            found[entry.name] = _load_plugin(entry)
        except ConfigError as error:
            if broken is None:
                raise
            broken.append(str(error))
    return found


def get_method_class(name: str) -> type[Method]:
    if name in METHODS:
        return METHODS[name]
    from importlib.metadata import entry_points

    # Only the requested plug-in is loaded: another, broken one must not stop it.
    for entry in entry_points(group=ENTRY_POINT_GROUP, name=name):
        return _load_plugin(entry)
    broken: list[str] = []
    methods = registered_methods(broken=broken)
    unloadable = f"; plug-ins that could not be loaded: {'; '.join(broken)}" if broken else ""
    raise ConfigError(f"unknown method {name!r}; choose one of {sorted(methods)}{unloadable}")


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
