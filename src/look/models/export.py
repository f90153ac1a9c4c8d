"""Export a backbone as a safetensors file that timm / torchvision load directly.

The file's keys are exactly those of ``timm.create_model(name)`` (or the torchvision model for
``tv:`` names) minus the classifier, so ``model.load_state_dict(load_file(path), strict=False)``
reports only the classifier as missing (torchvision's MNASNet also wants the layout version a
plain dict lacks: :func:`look.models.load_backbone_state` supplies it). Its safetensors metadata (string → string) records how to
rebuild the backbone: :func:`load_exported_backbone` needs nothing but the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from look import __version__
from look.atomic import atomic_write_path
from look.models.backbones import create_backbone
from look.models.weights import check_finite, load_backbone_state, read_safetensors

__all__ = [
    "EXPORT_FORMAT",
    "export_backbone",
    "load_exported_backbone",
    "read_export_metadata",
]

EXPORT_FORMAT = "look-backbone/1"
_RESERVED_METADATA = ("format", "name", "small_stem", "in_chans", "feature_dim", "look_version")


def _reference_state_shapes(
    name: str, *, small_stem: bool, in_chans: int, model_kwargs: dict[str, Any]
) -> tuple[dict[str, torch.Size], int]:
    """Key → shape of a freshly built backbone, built without allocating weights where possible."""
    try:
        with torch.device("meta"):
            reference, feature_dim = create_backbone(
                name, small_stem=small_stem, in_chans=in_chans, model_kwargs=model_kwargs
            )
    except Exception:
        # Some initialisers do real computation on meta tensors; retry with a normal (slower) build,
        # which raises the real error if there is one.
        reference, feature_dim = create_backbone(
            name, small_stem=small_stem, in_chans=in_chans, model_kwargs=model_kwargs
        )
    return {k: v.shape for k, v in reference.state_dict().items()}, feature_dim


def _unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module


def export_backbone(
    backbone: nn.Module,
    name: str,
    path: str | Path,
    *,
    small_stem: bool,
    in_chans: int = 3,
    model_kwargs: dict[str, Any] | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``backbone``'s weights to a safetensors file loadable by timm/torchvision and by us.

    Args:
        backbone: a module built by ``create_backbone(name, small_stem=small_stem, in_chans=in_chans)``
            (its keys and shapes are checked against a fresh build); DDP and ``torch.compile``
            wrappers are unwrapped.
        name: the backbone name it was built from.
        path: output file (``.safetensors``); parent folders are created; written atomically.
        small_stem, in_chans, model_kwargs: as passed to ``create_backbone`` (the constructor
            arguments are recorded as JSON, so :func:`load_exported_backbone` rebuilds with them).
        extra_metadata: more string → string entries (e.g. method, dataset, epoch).

    Returns:
        The path written.

    Raises ``ValueError`` for a backbone whose keys or shapes differ from the fresh build's, and
    for weights holding NaN or infinite values (a diverged run's), naming the tensors.

    Only ``name``, ``small_stem``, ``in_chans`` and ``model_kwargs`` are recorded for rebuilding:
    a module built with other arguments than those (say a ``SmallResNet(stem_stride=1)`` built
    by hand) has the same keys and shapes and passes the check, but
    :func:`load_exported_backbone` rebuilds what the recorded arguments build.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"export path must end in .safetensors, got {str(path)!r}")
    extra_metadata = dict(extra_metadata or {})
    bad_entries = [
        (k, v)
        for k, v in extra_metadata.items()
        if not isinstance(k, str) or not isinstance(v, str)
    ]
    if bad_entries:
        raise ValueError(
            f"extra_metadata must map str to str; offending entries: {bad_entries[:5]}"
        )
    clashes = sorted(set(extra_metadata) & {*_RESERVED_METADATA, "model_kwargs"})
    if clashes:
        raise ValueError(f"extra_metadata may not set the reserved keys {clashes}")

    model_kwargs = dict(model_kwargs or {})
    state = _unwrap(backbone).state_dict()
    expected_shapes, feature_dim = _reference_state_shapes(
        name, small_stem=small_stem, in_chans=in_chans, model_kwargs=model_kwargs
    )
    missing = sorted(set(expected_shapes) - set(state))
    unexpected = sorted(set(state) - set(expected_shapes))
    mismatched = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(s)}"
        for k, s in expected_shapes.items()
        if k in state and state[k].shape != s
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"the backbone does not match create_backbone({name!r}, small_stem={small_stem}, "
            f"in_chans={in_chans}): missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {mismatched[:5]}"
        )

    # An export is what evaluations and other runs start from: refuse a diverged run's weights
    # here, as loading them would, rather than write a file every later step fails on.
    check_finite(state, f"the weights of the {name!r} backbone to export to {str(path)!r}")
    # safetensors refuses tensors that share storage (tied weights, views): give each its own copy.
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    metadata = {
        "format": EXPORT_FORMAT,
        "name": name,
        "small_stem": "true" if small_stem else "false",
        "in_chans": str(in_chans),
        "feature_dim": str(feature_dim),
        "look_version": __version__,
        **({"model_kwargs": json.dumps(model_kwargs, sort_keys=True)} if model_kwargs else {}),
        **extra_metadata,
    }
    # Write beside the target and rename, so an interrupted export never leaves a truncated file.
    with atomic_write_path(path, suffix=".safetensors.tmp") as temp:
        save_file(tensors, str(temp), metadata=metadata)
        _sort_header_metadata(temp)
    return path


def _sort_header_metadata(path: Path) -> None:
    """Rewrite a safetensors file's header with its metadata entries in key order, in place.

    safetensors writes the metadata in the order of a Rust hash map, which differs from one
    process to the next, so the same backbone exported twice gave files that differed in their
    first bytes. The header is JSON after its 8-byte length and padded with spaces: the same
    entries in another order take the same bytes, and the tensors after it stay where they are.
    (A header that would not fit, which a reordering never makes, is left as written.)"""
    with path.open("r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        metadata = header.pop("__metadata__", None)
        if metadata is None:
            return
        ordered = {"__metadata__": dict(sorted(metadata.items())), **header}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length:
            return
        handle.seek(8)
        handle.write(text + b" " * (length - len(text)))


def read_export_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of an exported backbone (raises if the file is not one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported backbone {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except SafetensorError as error:
        # Another file under a .safetensors name gives "header too large": name the file instead.
        raise ValueError(
            f"{str(path)!r} is not a safetensors file, or a damaged one, so not a look backbone "
            f"export ({type(error).__name__}: {error})"
        ) from error
    if metadata.get("format") != EXPORT_FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a look backbone export (metadata format "
            f"{metadata.get('format')!r}, expected {EXPORT_FORMAT!r}); plain weights load into a "
            "named backbone: look evaluate --timm NAME --weights FILE, or "
            "model.pretrained_weights"
        )
    absent = [k for k in _RESERVED_METADATA if k not in metadata]
    if absent:
        raise ValueError(f"{str(path)!r} lacks the metadata entries {absent}")
    return metadata


def load_exported_backbone(path: str | Path) -> tuple[nn.Module, int]:
    """Rebuild a backbone written by :func:`export_backbone` from its metadata and load its weights.

    Returns ``(backbone, feature_dim)``; the backbone is in training mode (call ``.eval()`` to use it).
    """
    metadata = read_export_metadata(path)
    if metadata["small_stem"] not in ("true", "false"):
        raise ValueError(f"{str(path)!r}: small_stem metadata is {metadata['small_stem']!r}")
    backbone, feature_dim = create_backbone(
        metadata["name"],
        small_stem=metadata["small_stem"] == "true",
        in_chans=int(metadata["in_chans"]),
        model_kwargs=json.loads(metadata.get("model_kwargs", "{}")),
    )
    if feature_dim != int(metadata["feature_dim"]):
        raise ValueError(
            f"{str(path)!r} says feature_dim={metadata['feature_dim']} but {metadata['name']!r} "
            f"now builds with {feature_dim}; the model definition changed since the export"
        )
    try:
        load_backbone_state(backbone, read_safetensors(path), strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"weights in {str(path)!r} do not fit {metadata['name']!r}: {error}"
        ) from error
    return backbone, feature_dim
