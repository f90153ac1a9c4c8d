"""Reading weight files and loading them into backbones, with every key accounted for.

A weight file is a ``.safetensors`` file or a ``.pth``/``.pt`` checkpoint (read with
``torch.load(weights_only=True)``, so no pickled code runs). Keys written by wrappers (``module.``
from DDP, ``_orig_mod.`` from ``torch.compile``, ``backbone.``/``encoder.`` from training code) are
stripped with ``str.removeprefix``. Loading is strict except for the classifier: a file may carry
classifier weights the backbone has no place for (they are ignored and reported); any other
difference is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

__all__ = [
    "KNOWN_KEY_PREFIXES",
    "WeightLoadReport",
    "load_backbone_weights",
    "read_state_dict",
    "strip_known_prefixes",
    "strip_prefix",
]

logger = logging.getLogger(__name__)

# Prefixes that wrappers put in front of backbone keys: DDP, torch.compile, and training code that
# stores the encoder as an attribute. Stripped repeatedly: "module.backbone.conv1.weight" becomes
# "conv1.weight".
KNOWN_KEY_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.", "backbone.", "encoder.")

_TORCH_SUFFIXES = (".pth", ".pt")
# Checkpoints often nest the weights one level down under one of these keys.
_NESTED_STATE_DICT_KEYS = ("state_dict", "model")


@dataclass(frozen=True)
class WeightLoadReport:
    """What :func:`load_backbone_weights` did with each key of the file (after prefix stripping)."""

    path: Path
    loaded_keys: tuple[str, ...]
    ignored_keys: tuple[str, ...]
    """Classifier keys present in the file that the backbone (classifier removed) does not have."""
    defaulted_keys: tuple[str, ...]
    """``num_batches_tracked`` counters absent from the file; they keep their initial value."""


def strip_prefix(
    state_dict: Mapping[str, torch.Tensor], prefix: str, *, keep_unmatched: bool = True
) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from the start of every key that has it (``str.removeprefix``, never ``lstrip``).

    Keys without the prefix are kept unchanged, or dropped when ``keep_unmatched`` is False (handy to
    pull ``backbone.*`` out of a whole-model state dict).
    """
    if not prefix:
        raise ValueError("prefix must be a non-empty string, e.g. 'module.'")
    stripped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix) and not keep_unmatched:
            continue
        new_key = key.removeprefix(prefix)
        if new_key in stripped:
            raise ValueError(
                f"stripping {prefix!r} maps two keys to {new_key!r}; the state dict mixes prefixed "
                "and unprefixed copies of the same weights"
            )
        stripped[new_key] = value
    return stripped


def strip_known_prefixes(
    state_dict: Mapping[str, torch.Tensor], prefixes: Iterable[str] = KNOWN_KEY_PREFIXES
) -> dict[str, torch.Tensor]:
    """Strip any of ``prefixes`` from the front of each key, repeatedly, until none applies."""
    prefixes = tuple(prefixes)
    stripped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = key
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if new_key.startswith(prefix):
                    new_key = new_key.removeprefix(prefix)
                    changed = True
        if new_key in stripped:
            raise ValueError(
                f"key {key!r} becomes {new_key!r} after stripping {list(prefixes)}, which another key "
                "already became; the file mixes prefixed and unprefixed copies of the same weights"
            )
        stripped[new_key] = value
    return stripped


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` dict from a ``.safetensors`` or ``.pth``/``.pt`` file (CPU).

    A checkpoint that nests its weights under ``"state_dict"`` or ``"model"`` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    if path.suffix not in _TORCH_SUFFIXES:
        raise ValueError(
            f"weight file {str(path)!r} has suffix {path.suffix!r}; expected .safetensors, .pth or .pt"
        )
    # torch raises UnpicklingError and others for files it refuses; all mean the same to users.
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"could not read {str(path)!r} with torch.load(weights_only=True): {error}. "
            "Only plain tensor checkpoints are accepted; convert it to .safetensors"
        ) from error
    while isinstance(loaded, Mapping) and not _is_flat_tensor_dict(loaded):
        nested_key = next((k for k in _NESTED_STATE_DICT_KEYS if k in loaded), None)
        if nested_key is None:
            raise ValueError(
                f"{str(path)!r} is not a flat state dict of tensors and has none of the keys "
                f"{list(_NESTED_STATE_DICT_KEYS)} to look under; top-level keys: {sorted(loaded)[:10]}"
            )
        loaded = loaded[nested_key]
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(loaded).__name__}, not a state dict")
    return dict(loaded)


def _is_flat_tensor_dict(mapping: Mapping[object, object]) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in mapping.items())


def _summarise(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def load_backbone_weights(
    backbone: nn.Module,
    path: str | Path,
    *,
    classifier_prefixes: Iterable[str] = ("fc",),
    strip_prefixes: Iterable[str] = KNOWN_KEY_PREFIXES,
) -> WeightLoadReport:
    """Load a weight file into ``backbone`` in place; only classifier keys may be left over.

    Keys are stripped of ``strip_prefixes``. File keys under one of ``classifier_prefixes`` (the
    classifier the backbone was built without, e.g. ``"fc"`` for ResNets) are ignored and reported.
    Raises ``ValueError`` when the backbone has a key the file lacks, the file has a non-classifier
    key the backbone lacks, or a shape differs.
    """
    path = Path(path)
    file_state = strip_known_prefixes(read_state_dict(path), strip_prefixes)
    model_state = backbone.state_dict()
    classifier_prefixes = tuple(classifier_prefixes)

    def is_classifier_key(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in classifier_prefixes)

    extra = [k for k in file_state if k not in model_state]
    ignored = [k for k in extra if is_classifier_key(k)]
    unexpected = [k for k in extra if not is_classifier_key(k)]
    absent = [k for k in model_state if k not in file_state]
    defaulted = [k for k in absent if k.endswith("num_batches_tracked")]
    missing = [k for k in absent if not k.endswith("num_batches_tracked")]
    mismatched = [
        f"{k}: file {tuple(file_state[k].shape)} vs model {tuple(model_state[k].shape)}"
        for k in model_state
        if k in file_state and file_state[k].shape != model_state[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing from the file: {_summarise(missing)}")
    if unexpected:
        problems.append(f"not in the model: {_summarise(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_summarise(mismatched, limit=4)}")
    if problems:
        raise ValueError(
            f"weights in {str(path)!r} do not fit this {type(backbone).__name__} backbone "
            f"(after stripping prefixes {list(strip_prefixes)}): " + "; ".join(problems) + ". "
            "Check the backbone name, small_stem (it changes conv1) and in_chans."
        )

    loadable = {k: v for k, v in file_state.items() if k in model_state}
    result = backbone.load_state_dict(loadable, strict=False)
    # Everything was checked above; this guards against a module whose state_dict and
    # load_state_dict disagree.
    if result.unexpected_keys or set(result.missing_keys) - set(defaulted):
        raise ValueError(
            f"loading {str(path)!r} left keys unmatched: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    report = WeightLoadReport(
        path=path,
        loaded_keys=tuple(sorted(loadable)),
        ignored_keys=tuple(sorted(ignored)),
        defaulted_keys=tuple(sorted(defaulted)),
    )
    if ignored:
        logger.info("loaded %s; ignored classifier keys: %s", path, ", ".join(report.ignored_keys))
    if defaulted:
        logger.info(
            "loaded %s; kept initial values of %d num_batches_tracked", path, len(defaulted)
        )
    return report
