"""Reading weight files and loading them into backbones, with every key accounted for.

A weight file is a ``.safetensors`` file or a ``.pth``/``.pt`` checkpoint (read with
``torch.load(weights_only=True)``, so no pickled code runs). A ``look pretrain`` run directory
stands for its ``backbone.safetensors``, and a ``look pretrain`` checkpoint gives its online
backbone's weights (not the momentum copies, heads or classifiers). Keys written by wrappers
(``module.`` from DDP, ``_orig_mod.`` from ``torch.compile``, ``backbone.``/``encoder.`` from
training code) are stripped with ``str.removeprefix``. Loading is strict except for the
classifier: a file may carry classifier weights the backbone has no place for (they are ignored
and reported); any other difference is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

__all__ = [
    "KNOWN_KEY_PREFIXES",
    "WeightLoadReport",
    "backbone_state_from_checkpoint",
    "load_backbone_weights",
    "read_safetensors",
    "read_state_dict",
    "resolve_weight_file",
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
# What `look pretrain` writes: the exported backbone in the run directory, and checkpoints whose
# "model" entry is the method's state dict, with the online backbone under "backbone.".
RUN_BACKBONE_FILE = "backbone.safetensors"
_LOOK_CHECKPOINT_KEYS = ("model", "config", "global_step")
_LOOK_BACKBONE_PREFIX = "backbone."
# Longest original error text kept in our messages (SafetensorError / torch errors can be long).
_DETAIL_LIMIT = 200


@dataclass(frozen=True)
class WeightLoadReport:
    """What :func:`load_backbone_weights` did with each key of the file (after prefix stripping)."""

    path: Path
    loaded_keys: tuple[str, ...]
    ignored_keys: tuple[str, ...]
    """Classifier keys present in the file that the backbone (classifier removed) does not have."""
    defaulted_keys: tuple[str, ...]
    """``num_batches_tracked`` counters absent from the file; they keep their initial value."""
    source: str = ""
    """What the weights were taken from when not the whole file, e.g. a checkpoint's backbone."""

    @property
    def summary(self) -> str:
        """One line for users: ``loaded 62 tensors from w.pth (ignored: fc.bias, fc.weight)``."""
        notes = [self.source] if self.source else []
        if self.ignored_keys:
            notes.append("ignored: " + ", ".join(self.ignored_keys))
        if self.defaulted_keys:
            notes.append(
                f"{len(self.defaulted_keys)} num_batches_tracked left at their initial value"
            )
        details = f" ({'; '.join(notes)})" if notes else ""
        return f"loaded {len(self.loaded_keys)} tensors from {self.path}{details}"


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


def resolve_weight_file(path: str | Path) -> Path:
    """The file to read for ``path``: itself, or a ``look pretrain`` run directory's backbone file.

    Raises ``FileNotFoundError`` for a path that does not exist and for a directory without
    ``backbone.safetensors`` (a run that has not finished: export one from its checkpoint).
    """
    path = Path(path)
    if path.is_dir():
        backbone_file = path / RUN_BACKBONE_FILE
        if backbone_file.is_file():
            return backbone_file
        if not (path / "checkpoints").is_dir():
            raise FileNotFoundError(
                f"{str(path)!r} is a directory, not a weight file nor a look pretrain run "
                f"directory (it has no {RUN_BACKBONE_FILE} and no checkpoints/)"
            )
        raise FileNotFoundError(
            f"the run directory {str(path)!r} has no {RUN_BACKBONE_FILE} (look pretrain writes "
            f"it when the run ends); write it with `look export --checkpoint {path} --output "
            "FILE.safetensors` and pass FILE, or pass one of its checkpoints/ckpt-*.pt"
        )
    if not path.is_file():
        raise FileNotFoundError(f"weight file {str(path)!r} does not exist")
    return path


def _detail(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= _DETAIL_LIMIT else text[: _DETAIL_LIMIT - 3] + "..."


def _sniffed_format(path: Path) -> str | None:
    """``"safetensors"`` or ``"torch.save"`` when the first bytes look like one, else None."""
    with path.open("rb") as handle:
        head = handle.read(10)
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if len(head) == 10 and head[8:10] == b'{"':
        return "safetensors"
    # torch.save: a zip archive (PyTorch >= 1.6), or a pickle (protocol >= 2 starts with 0x80).
    if head.startswith(b"PK") or head.startswith(b"\x80"):
        return "torch.save"
    return None


def _format_hint(path: Path) -> str:
    sniffed = _sniffed_format(path)
    if sniffed == "safetensors" and path.suffix != ".safetensors":
        return "; it looks like a safetensors file: rename it to .safetensors"
    if sniffed == "torch.save" and path.suffix not in _TORCH_SUFFIXES:
        return "; it looks like a torch.save file: rename it to .pth"
    return ""


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file on the CPU; a file of another format gives a ``ValueError``."""
    path = Path(path)
    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as error:
        raise ValueError(
            f"{str(path)!r} is not a safetensors file, or a damaged one ({_detail(error)})"
            f"{_format_hint(path)}"
        ) from error


def _is_look_checkpoint(loaded: object) -> TypeGuard[Mapping[str, Any]]:
    return (
        isinstance(loaded, Mapping)
        and all(key in loaded for key in _LOOK_CHECKPOINT_KEYS)
        and isinstance(loaded["model"], Mapping)
    )


def backbone_state_from_checkpoint(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The online backbone's weights of a ``look pretrain`` checkpoint, with the method prefix
    ``backbone.`` removed; momentum copies (``ema_backbone.``, ``key_backbone.``), heads,
    classifiers and memories are left out."""
    return {
        key.removeprefix(_LOOK_BACKBONE_PREFIX): value
        for key, value in state["model"].items()
        if isinstance(key, str) and key.startswith(_LOOK_BACKBONE_PREFIX)
    }


def _look_checkpoint_backbone(loaded: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """:func:`backbone_state_from_checkpoint`, refused when it finds no backbone tensors."""
    backbone_state = backbone_state_from_checkpoint(loaded)
    if not backbone_state or not _is_flat_tensor_dict(backbone_state):
        raise ValueError(
            f"{str(path)!r} is a look pretrain checkpoint without backbone tensors under "
            f"'model' (keys starting with {_LOOK_BACKBONE_PREFIX!r})"
        )
    return backbone_state


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of an existing file, and a note on where in the file it came from."""
    if path.suffix == ".safetensors":
        return read_safetensors(path), ""
    if path.suffix not in _TORCH_SUFFIXES:
        raise ValueError(
            f"weight file {str(path)!r} has suffix {path.suffix!r}; expected .safetensors, .pth or "
            f".pt, or a look pretrain run directory{_format_hint(path)}"
        )
    # A look checkpoint is checked against its run's manifest, as resuming from it would be:
    # a truncated or altered file must not start a pre-training or an evaluation.
    from look.engine.checkpoint import verify_listed_checkpoint

    verify_listed_checkpoint(path)
    # torch raises UnpicklingError and others for files it refuses; all mean the same to users.
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if _sniffed_format(path) != "torch.save":
            # A text file gives "KeyError: 101" (its first byte): say what the file is not.
            raise ValueError(
                f"{str(path)!r} is not a PyTorch weights file (torch.load: {_detail(error)})"
                f"{_format_hint(path)}"
            ) from error
        raise ValueError(
            f"could not read {str(path)!r} with torch.load(weights_only=True): {_detail(error)}. "
            "Only plain tensor checkpoints are accepted; convert it to .safetensors"
        ) from error
    if _is_look_checkpoint(loaded):
        note = f"online backbone of a look pretrain checkpoint, step {loaded['global_step']}"
        return _look_checkpoint_backbone(loaded, path), note
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
    return dict(loaded), ""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` dict from a ``.safetensors`` or ``.pth``/``.pt`` file (CPU).

    A ``look pretrain`` run directory is read through its ``backbone.safetensors``; a ``look
    pretrain`` checkpoint gives its online backbone (``backbone.`` removed); another checkpoint
    that nests its weights under ``"state_dict"`` or ``"model"`` is unwrapped. A file that is not
    what its suffix says gives a ``ValueError`` naming it.
    """
    return _read_weights(resolve_weight_file(path))[0]


def _is_flat_tensor_dict(mapping: Mapping[object, object]) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in mapping.items())


def _summarise(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def check_finite(state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise ``ValueError`` naming the keys of ``state`` (weights of ``what``) whose
    floating-point tensor holds a NaN or an infinity: weights a diverged run saved, which would
    make every feature and loss NaN."""
    non_finite = [
        key
        for key, tensor in state.items()
        if isinstance(tensor, torch.Tensor)
        and tensor.is_floating_point()
        and not bool(torch.isfinite(tensor).all())
    ]
    if non_finite:
        raise ValueError(
            f"{what} hold NaN or infinite values in {_summarise(non_finite)}: saved from a run "
            "that diverged? Every feature and loss would be NaN"
        )


def load_backbone_weights(
    backbone: nn.Module,
    path: str | Path,
    *,
    classifier_prefixes: Iterable[str] = ("fc",),
    strip_prefixes: Iterable[str] = KNOWN_KEY_PREFIXES,
) -> WeightLoadReport:
    """Load a weight file into ``backbone`` in place; only classifier keys may be left over.

    ``path`` is anything :func:`read_state_dict` reads (a file, a look pretrain run directory or
    checkpoint). The returned report's ``summary`` is one line saying what was loaded.

    Keys are stripped of ``strip_prefixes``. File keys under one of ``classifier_prefixes`` (the
    classifier the backbone was built without, e.g. ``"fc"`` for ResNets) are ignored and reported.
    Raises ``ValueError`` when the backbone has a key the file lacks, the file has a non-classifier
    key the backbone lacks, or a shape differs.
    """
    path = resolve_weight_file(path)
    raw_state, source = _read_weights(path)
    file_state = strip_known_prefixes(raw_state, strip_prefixes)
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
    check_finite(loadable, f"the weights in {str(path)!r}")
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
        source=source,
    )
    logger.info("%s", report.summary)
    return report
