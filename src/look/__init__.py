"""LOOK: Leave-One-Out K-Nearest-Neighbour supervised pre-training, and its baselines.

The subpackages load on first use, so ``import look`` stays cheap and ``look.losses.LookLoss``
works without importing ``look.losses`` first: ``losses``, ``memory``, ``search``, ``sharded``,
``methods``, ``models``, ``data``, ``engine``, ``evaluation``, ``analysis``, ``config``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__version__ = "0.1.0"

_SUBMODULES = (
    "analysis",
    "config",
    "data",
    "engine",
    "evaluation",
    "losses",
    "memory",
    "methods",
    "models",
    "search",
    "sharded",
)
# The GPU search kernels (README: look.search_triton.HOPPER_CONFIG): loaded on first use like
# the others, but left out of ``from look import *``, which would import Triton.
_KERNEL_MODULES = ("search_triton", "search_gluon")
__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str) -> ModuleType:
    if name in _SUBMODULES or name in _KERNEL_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
