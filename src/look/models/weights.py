"""Reading weight files and loading them into backbones, with every key accounted for.

A weight file is a ``.safetensors`` file or a ``.pth``/``.pt`` checkpoint (read with
``torch.load(weights_only=True)``, so no pickled code runs). A ``look pretrain`` run directory
stands for its ``backbone.safetensors``, and a ``look pretrain`` checkpoint gives its online
backbone's weights (not the momentum copies, heads or classifiers). Keys written by wrappers
(``module.`` from DDP, ``_orig_mod.`` from ``torch.compile``, ``backbone.``/``encoder.`` from
training code) are stripped with ``str.removeprefix``, from each key only until it names a
tensor of the backbone (torchvision's ViT keeps its own ``encoder.``). When every key of the file
shares one other prefix (Lightning's ``model.``, MoCo's ``encoder_q.``) and removing it makes the
file fit exactly, it is removed too. Loading is strict except for the classifier: a file may carry
classifier weights the backbone has no place for (they are ignored and reported); any other
difference is an error, except a 1-channel first convolution, which is spread over the 3 input
channels look feeds (see :func:`load_backbone_weights`).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from look.engine.checkpoint import describe_torch_load_error, is_look_checkpoint

__all__ = [
    "KNOWN_KEY_PREFIXES",
    "WeightLoadReport",
    "backbone_state_from_checkpoint",
    "check_finite",
    "describe_torch_load_error",
    "load_backbone_state",
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
# "conv1.weight", but a key that already names a tensor of the model keeps the rest
# ("encoder.layers.0..." of torchvision's ViT is its own).
KNOWN_KEY_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.", "backbone.", "encoder.")

_TORCH_SUFFIXES = (".pth", ".pt")
# Checkpoints often nest the weights one level down under one of these keys.
_NESTED_STATE_DICT_KEYS = ("state_dict", "model")
# What `look pretrain` writes: the exported backbone in the run directory, and checkpoints whose
# "model" entry is the method's state dict, with the online backbone under "backbone.".
RUN_BACKBONE_FILE = "backbone.safetensors"
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
            notes.append("ignored: " + _grouped(self.ignored_keys))
        if self.defaulted_keys:
            notes.append(
                f"{len(self.defaulted_keys)} num_batches_tracked left at their initial value"
            )
        details = f" ({'; '.join(notes)})" if notes else ""
        return f"loaded {len(self.loaded_keys)} tensors from {self.path}{details}"


def _grouped(keys: Iterable[str]) -> str:
    """``fc.bias, fc.weight``, with a module of more than two keys as one entry: ``aux1.* (10)``
    (torchvision's GoogLeNet file carries two auxiliary classifiers)."""
    groups: dict[str, list[str]] = {}
    for key in sorted(keys):
        groups.setdefault(key.split(".")[0], []).append(key)
    return ", ".join(
        ", ".join(members) if len(members) <= 2 else f"{module}.* ({len(members)})"
        for module, members in groups.items()
    )


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
    state_dict: Mapping[str, torch.Tensor],
    prefixes: Iterable[str] = KNOWN_KEY_PREFIXES,
    *,
    fits: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Strip any of ``prefixes`` from the front of each key, repeatedly, until none applies.

    With ``fits``, a key is left as it is as soon as ``fits(key)`` holds: a model may name its own
    submodule like a wrapper (torchvision's ViT has ``encoder.layers...``), and those keys must
    keep their prefix while a DDP copy's ``module.encoder.layers...`` loses only ``module.``.
    """
    prefixes = tuple(prefixes)
    stripped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = key
        changed = True
        while changed and not (fits is not None and fits(new_key)):
            changed = False
            for prefix in prefixes:
                if new_key.startswith(prefix):
                    new_key = new_key.removeprefix(prefix)
                    changed = True
                    break  # check fits() again before the next prefix
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
        if "Weights only load failed" in str(error):
            # A timm train.py checkpoint (argparse args beside the weights), a whole pickled
            # model: the tensors are there, but reading them would run the file's pickled code.
            hint = (
                "it pickles Python objects besides tensors: where you trust it, load it in "
                "Python and save its state dict (its 'state_dict' entry, or model.state_dict()) "
                "with safetensors.torch.save_file, then pass that .safetensors file"
            )
        else:
            hint = "is the file whole? Only plain tensor checkpoints are accepted"
        raise ValueError(
            f"could not read {str(path)!r} with torch.load(weights_only=True): "
            f"{describe_torch_load_error(error)}; {hint}"
        ) from error
    if is_look_checkpoint(loaded):
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


def load_backbone_state(
    module: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True
) -> _IncompatibleKeys:
    """``module.load_state_dict(state, strict=strict)``, with ``module``'s own layout versions
    when ``state`` carries none.

    ``state_dict()`` records each submodule's layout version in a ``_metadata`` attribute, which
    safetensors files and dicts built from other dicts lack. Most modules then assume their
    current layout, but torchvision's MNASNet raises ``ValueError: version should be set to 1 or
    2 instead of None``. ``state`` is taken to be in the layout ``module`` was built with (true
    of look's exports and checkpoints); a ``state`` with its own ``_metadata`` keeps it. As for
    ``module.state_dict()`` itself, a BatchNorm's ``num_batches_tracked`` is then a key like any
    other (without versions BatchNorm fills in an absent one). Raises what ``load_state_dict``
    raises (``RuntimeError`` for keys or shapes that do not fit).
    """
    if getattr(state, "_metadata", None) is None:
        versioned: OrderedDict[str, torch.Tensor] = OrderedDict(state)
        versioned._metadata = module.state_dict()._metadata  # type: ignore[attr-defined]
        state = versioned
    return module.load_state_dict(state, strict=strict)


@dataclass(frozen=True)
class _KeyFit:
    """How a file's (stripped) keys compare with the backbone's."""

    ignored: list[str]
    unexpected: list[str]
    defaulted: list[str]
    missing: list[str]
    mismatched: list[str]

    @property
    def fits(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def _fit_keys(
    file_state: Mapping[str, torch.Tensor],
    model_state: Mapping[str, torch.Tensor],
    is_classifier_key: Callable[[str], bool],
) -> _KeyFit:
    extra = [k for k in file_state if k not in model_state]
    absent = [k for k in model_state if k not in file_state]
    return _KeyFit(
        ignored=[k for k in extra if is_classifier_key(k)],
        unexpected=[k for k in extra if not is_classifier_key(k)],
        defaulted=[k for k in absent if k.endswith("num_batches_tracked")],
        missing=[k for k in absent if not k.endswith("num_batches_tracked")],
        mismatched=[
            k
            for k in model_state
            if k in file_state and file_state[k].shape != model_state[k].shape
        ],
    )


def _spread_single_channel(
    file_state: dict[str, torch.Tensor], model_state: Mapping[str, torch.Tensor], fit: _KeyFit
) -> str | None:
    """Adapt a 1-channel first convolution (a model trained on grey images) to the model's input
    channels, in ``file_state``, when it is all that differs; returns a note, or None.

    look feeds every image as 3 channels (grey ones repeated), so each channel gets the weight
    divided by 3, as timm's ``adapt_input_conv`` does: on a grey image the features are exactly
    the 1-channel model's, on a colour image those of its channel mean.
    """
    if fit.missing or fit.unexpected or len(fit.mismatched) != 1:
        return None
    key = fit.mismatched[0]
    # Only the first convolution (the stem, a ViT's patch embedding) sees the image channels.
    first_conv = next((k for k, v in model_state.items() if v.dim() == 4), None)
    weight, target = file_state[key], model_state[key]
    if key != first_conv or weight.dim() != 4 or weight.shape[1] != 1 or target.shape[1] == 1:
        return None
    if (weight.shape[0], *weight.shape[2:]) != (target.shape[0], *target.shape[2:]):
        return None
    channels = target.shape[1]
    file_state[key] = weight.repeat(1, channels, 1, 1) / channels
    return f"{key}: 1 input channel spread over {channels}, each weight / {channels}"


def _common_prefixes(keys: Iterable[str]) -> list[str]:
    """The dotted prefixes every key shares, shortest first: ``["model.", "model.net."]``."""
    common: list[str] | None = None
    for key in keys:
        parts = key.split(".")[:-1]
        if common is None:
            common = parts
        else:
            length = next(
                (i for i, (a, b) in enumerate(zip(common, parts, strict=False)) if a != b),
                min(len(common), len(parts)),
            )
            common = common[:length]
        if not common:
            return []
    return [".".join(common[:n]) + "." for n in range(1, len(common or []) + 1)]


def _prefixes_holding_the_backbone(
    file_state: Mapping[str, torch.Tensor],
    model_state: Mapping[str, torch.Tensor],
    is_classifier_key: Callable[[str], bool],
    strip: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]],
) -> list[str]:
    """Prefixes of file keys under which a whole backbone lies beside other weights (MoCo's
    ``encoder_q.`` and ``encoder_k.``): named in the error, not chosen between."""
    candidates: Counter[str] = Counter()
    for key in file_state:
        parts = key.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) in model_state:
                candidates[".".join(parts[:i]) + "."] += 1
    fitting = []
    for prefix, _ in candidates.most_common(4):
        try:
            part = strip(strip_prefix(file_state, prefix, keep_unmatched=False))
        except ValueError:  # two keys become one: not a backbone's copy
            continue
        if _fit_keys(part, model_state, is_classifier_key).fits:
            fitting.append(prefix)
    return sorted(fitting)


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

    Each key is stripped of ``strip_prefixes`` until it names a tensor of the backbone (or of its
    classifier). When the file still does not fit but every key shares one more prefix
    (Lightning's ``model.``, a MoCo encoder's ``encoder_q.``) whose removal makes the file fit
    exactly, it is removed and the report says so. File keys under one of
    ``classifier_prefixes`` (the classifier the backbone was built without, e.g. ``"fc"`` for
    ResNets) are ignored and reported. A 1-channel first convolution (weights of a model trained
    on grey images) is spread over the backbone's input channels, each weight divided by their
    number: look feeds grey images as 3 equal channels, so the features are the 1-channel
    model's. Raises ``ValueError`` when the backbone has a key the file lacks, the file has a
    non-classifier key the backbone lacks, or another shape differs.
    """
    path = resolve_weight_file(path)
    raw_state, source = _read_weights(path)
    model_state = backbone.state_dict()
    classifier_prefixes = tuple(classifier_prefixes)
    strip_prefixes = tuple(strip_prefixes)

    def is_classifier_key(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in classifier_prefixes)

    def strip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return strip_known_prefixes(
            state, strip_prefixes, fits=lambda k: k in model_state or is_classifier_key(k)
        )

    file_state = strip(raw_state)
    notes = [source] if source else []
    fit = _fit_keys(file_state, model_state, is_classifier_key)
    if not fit.fits:
        for prefix in _common_prefixes(file_state):
            try:
                candidate = strip(strip_prefix(file_state, prefix))
            except ValueError:
                continue
            candidate_fit = _fit_keys(candidate, model_state, is_classifier_key)
            # Exactly the backbone (and its classifier) under the prefix: nothing is guessed.
            if candidate_fit.fits or _spread_single_channel(
                dict(candidate), model_state, candidate_fit
            ):
                file_state, fit = candidate, candidate_fit
                notes.append(f"prefix {prefix!r} removed")
                break
    adapted = _spread_single_channel(file_state, model_state, fit)
    if adapted is not None:
        fit = _fit_keys(file_state, model_state, is_classifier_key)
        notes.append(adapted)
    if not fit.fits:
        raise ValueError(
            _misfit_message(
                backbone,
                path,
                strip_prefixes,
                file_state,
                model_state,
                fit,
                is_classifier_key,
                strip,
            )
        )

    loadable = {k: v for k, v in file_state.items() if k in model_state}
    check_finite(loadable, f"the weights in {str(path)!r}")
    result = load_backbone_state(backbone, loadable, strict=False)
    # Everything was checked above; this guards against a module whose state_dict and
    # load_state_dict disagree.
    if result.unexpected_keys or set(result.missing_keys) - set(fit.defaulted):
        raise ValueError(
            f"loading {str(path)!r} left keys unmatched: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    report = WeightLoadReport(
        path=path,
        loaded_keys=tuple(sorted(loadable)),
        ignored_keys=tuple(sorted(fit.ignored)),
        defaulted_keys=tuple(sorted(fit.defaulted)),
        source="; ".join(notes),
    )
    logger.info("%s", report.summary)
    return report


def _misfit_message(
    backbone: nn.Module,
    path: Path,
    strip_prefixes: tuple[str, ...],
    file_state: Mapping[str, torch.Tensor],
    model_state: Mapping[str, torch.Tensor],
    fit: _KeyFit,
    is_classifier_key: Callable[[str], bool],
    strip: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]],
) -> str:
    problems = []
    if fit.missing:
        problems.append(f"missing from the file: {_summarise(fit.missing)}")
    if fit.unexpected:
        problems.append(f"not in the model: {_summarise(fit.unexpected)}")
    if fit.mismatched:
        shapes = [
            f"{k}: file {tuple(file_state[k].shape)} vs model {tuple(model_state[k].shape)}"
            for k in fit.mismatched
        ]
        problems.append(f"shape mismatch: {_summarise(shapes, limit=4)}")
    hints = []
    holding = _prefixes_holding_the_backbone(file_state, model_state, is_classifier_key, strip)
    if holding:
        hints.append(
            f"The keys under {' and '.join(map(repr, holding))} hold this backbone beside other "
            "weights: save them without that prefix to a .safetensors file and pass that"
        )
    first_conv = next((k for k, v in model_state.items() if v.dim() == 4), None)
    if first_conv in fit.mismatched:
        file_shape, model_shape = file_state[first_conv].shape, model_state[first_conv].shape
        if len(file_shape) == 4 and (
            (file_shape[0], *file_shape[2:]) == (model_shape[0], *model_shape[2:])
        ):
            hints.append(
                f"{first_conv} takes {file_shape[1]} input channels, the model's "
                f"{model_shape[1]}: look feeds every image as 3 channels (grey ones repeated)"
            )
    hints.append(
        "Check the backbone name, its constructor arguments (model.backbone_kwargs, "
        "--timm-kwargs) and small_stem (it changes a ResNet's conv1); a look export or "
        "checkpoint rebuilds its own model from its record with look evaluate --checkpoint FILE"
    )
    return (
        f"weights in {str(path)!r} do not fit this {type(backbone).__name__} backbone "
        f"(after stripping prefixes {list(strip_prefixes)}): "
        + "; ".join(problems)
        + ". "
        + ". ".join(hints)
        + "."
    )
