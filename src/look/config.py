"""Run configuration: typed dataclasses, YAML recipes as defaults, ``--set key=value`` overrides.

The resolved configuration is a plain ``dict`` of built-in types (never an argparse or OmegaConf
object), so it can be written next to every run and stored in checkpoints that load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from look.atomic import atomic_write_text
from look.engine.stop_signals import DEFAULT_STOP_SIGNALS


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it and says how to fix it."""


@dataclass
class DataConfig:
    """Which data to pre-train on (see :class:`look.data.DataSpec` for the meaning of each field)."""

    dataset: str = "fashion_mnist"
    root: str | None = None
    labels: str = "fine"
    download: bool = False
    image_size: int | None = None
    subset: int | None = None
    augment: str = "auto"
    corrupt_images: str = "fail"
    num_workers: int = 2
    synthetic_num_samples: int = 512
    synthetic_num_classes: int = 4
    synthetic_image_size: int = 16


@dataclass
class ModelConfig:
    """The backbone; the projection head belongs to the method's options."""

    backbone: str = "look_cnn_small"
    small_stem: bool = False
    pretrained_weights: str | None = None
    # More constructor arguments for timm/torchvision, e.g. {img_size: 32, patch_size: 4} for a
    # ViT on small images; recorded in exports so that the backbone is rebuilt the same way.
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Optimiser and schedule. ``batch_size`` is the *global* batch, split evenly over ranks."""

    name: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    batch_size: int = 256
    epochs: int = 10
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    # Each rank's batch is cut into this many micro-batches, forward and backward one after the
    # other, gradients summed before one optimizer step: the same global batch in less memory.
    grad_accum_steps: int = 1
    lars_trust_coefficient: float = 0.001
    exclude_bias_and_norm_from_wd: bool = True


@dataclass
class TrainConfig:
    """How the loop runs: device, precision, logging, checkpoints, failure policy."""

    device: str = "auto"
    amp: str = "auto"
    channels_last: str = "auto"
    compile: bool = False
    checkpoint_every_steps: int = 500
    keep_checkpoints: int = 3
    log_every_steps: int = 10
    tensorboard: bool = True
    progress: bool = True
    deterministic: bool = False
    nan_policy: str = "stop"  # stop | skip (skip the step; stop after nan_max_consecutive_skips)
    nan_max_consecutive_skips: int = 10
    max_steps: int | None = None
    ddp_timeout_s: float = 600.0
    # Under torchrun, batch norm normalises with the statistics of the global batch (torch's
    # SyncBatchNorm, CUDA only), so several ranks train as one process with the whole batch.
    sync_batchnorm: bool = False
    export_backbone: bool = True
    # On the first of these signals the run finishes its step, saves a checkpoint there and exits
    # with status 75 (look.engine.stop_signals): a cluster's preemption or time limit costs no
    # step. Empty: signals act as they would without look (SIGTERM kills at once).
    stop_signals: list[str] = field(default_factory=lambda: list(DEFAULT_STOP_SIGNALS))
    # kNN transfer monitor (look.engine.monitor): a dataset SPEC as `look evaluate --dataset`
    # takes (null: off), measured before the first step and after every epoch.
    knn_monitor: str | None = None
    knn_monitor_labels: str = "fine"
    knn_monitor_k: int = 20
    knn_monitor_images: int | None = 5000  # stratified subset of each split (null: all)


@dataclass
class RunConfig:
    """Everything one pre-training run needs. ``method`` is validated by the method's own options."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "look"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_CHOICES: dict[str, tuple[str, ...]] = {
    "optim.name": ("sgd", "lars", "adamw"),
    "train.amp": ("auto", "none", "bf16", "fp16"),
    "train.channels_last": ("auto", "true", "false"),
    "train.nan_policy": ("stop", "skip"),
}


def _suggest(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=3)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line (``(at line L, column C: problem)``): the parser's own
    message spans several, with a caret under the spot."""
    mark = getattr(exc, "problem_mark", None)
    where = f"at line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["?"])[0]
    return f"({where}{problem})"


def _list_example(key: str, value: object) -> str:
    """How to write a one-element list on the command line, for a value given bare."""
    return f" (e.g. --set {key}=[{value}])" if isinstance(value, (str, int, float)) else ""


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a dataclass field annotation, converting ints to floats."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, str):
            # PyYAML reads `1e-4` (no dot) as a string; accept any spelling Python reads as a float.
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return value
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool) and {"true", "false"} <= set(_CHOICES.get(key, ())):
            # YAML reads `--set train.channels_last=false` as a boolean; the field spells it.
            return "true" if value else "false"
        # YAML 1.1 reads yes/no/on/off as booleans: say so, or "got False" puzzles the user who
        # typed `data.augment=no` (quote it to keep the word: `data.augment="no"`).
        read_as = (
            " (YAML reads yes/no/on/off as true/false: quote a word meant as text)"
            if isinstance(value, bool)
            else ""
        )
        if key in _CHOICES:
            raise ConfigError(f"{key} must be one of {list(_CHOICES[key])}, got {value!r}{read_as}")
        raise ConfigError(f"{key} must be a string, got {value!r}{read_as}")
    if origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise ConfigError(f"{key} must be a list, got {value!r}{_list_example(key, value)}")
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        if isinstance(value, (list, tuple)):
            return [_coerce(element, item, key) for element in value]
        raise ConfigError(f"{key} must be a list, got {value!r}{_list_example(key, value)}")
    if origin is dict or annotation is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    return value


def dataclass_from_dict(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from ``values``; unknown keys and wrong types raise ConfigError."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            # Without a near miss (``model.name`` for ``model.backbone``) list the section's keys.
            hint = _suggest(str(key), names) or f" Valid keys here: {', '.join(sorted(names))}."
            raise ConfigError(f"unknown config key {full!r}.{hint}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = dataclass_from_dict(annotation, value, full)
        else:
            kwargs[key] = _coerce(value, annotation, full)
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if required:  # (a plug-in method's option without a default: a TypeError otherwise)
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{', '.join(repr(where + name) for name in required)} must be given: no default"
        )
    return cls(**kwargs)


def _validate(cfg: RunConfig) -> None:
    flat = to_dict(cfg)
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = flat[section][name]
        if value not in choices:
            raise ConfigError(
                f"{key}={value!r} is not one of {list(choices)}.{_suggest(str(value), choices)}"
            )
    positive = {
        "optim.lr": cfg.optim.lr,
        "optim.batch_size": cfg.optim.batch_size,
        "optim.grad_accum_steps": cfg.optim.grad_accum_steps,
        "optim.epochs": cfg.optim.epochs,
        "train.checkpoint_every_steps": cfg.train.checkpoint_every_steps,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "train.log_every_steps": cfg.train.log_every_steps,
        "train.ddp_timeout_s": cfg.train.ddp_timeout_s,
        "train.nan_max_consecutive_skips": cfg.train.nan_max_consecutive_skips,
        "train.knn_monitor_k": cfg.train.knn_monitor_k,
        "data.synthetic_num_samples": cfg.data.synthetic_num_samples,
        "data.synthetic_num_classes": cfg.data.synthetic_num_classes,
        "data.synthetic_image_size": cfg.data.synthetic_image_size,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value!r}")
    non_negative = {
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.momentum": cfg.optim.momentum,
        "optim.warmup_epochs": cfg.optim.warmup_epochs,
        "optim.min_lr_ratio": cfg.optim.min_lr_ratio,
        "data.num_workers": cfg.data.num_workers,
        "seed": cfg.seed,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value!r}")
    if cfg.optim.warmup_epochs > cfg.optim.epochs:
        raise ConfigError(
            f"optim.warmup_epochs={cfg.optim.warmup_epochs} exceeds optim.epochs={cfg.optim.epochs}"
        )
    for key, value in {
        "optim.grad_clip": cfg.optim.grad_clip,
        "train.max_steps": cfg.train.max_steps,
        "train.knn_monitor_images": cfg.train.knn_monitor_images,
        "data.subset": cfg.data.subset,
        "data.image_size": cfg.data.image_size,
    }.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be > 0 or null, got {value!r}")
    from look.engine.stop_signals import signal_numbers

    try:
        signal_numbers(cfg.train.stop_signals)
    except ValueError as exc:
        raise ConfigError(f"train.stop_signals: {exc}") from exc
    labels = cfg.train.knn_monitor_labels
    if labels not in ("fine", "coarse") and not str(labels).endswith(".json"):
        # (checked with the monitor off too: a typo must not wait for the day it is turned on)
        raise ConfigError(
            f"train.knn_monitor_labels must be fine, coarse or a grouping .json, got {labels!r}"
        )
    _validate_data(cfg.data)
    if not isinstance(cfg.method, dict) or not isinstance(cfg.method.get("name"), str):
        raise ConfigError("method must be a mapping with a 'name' key, e.g. {name: look, k: 200}")


def data_spec_from_config(data: DataConfig) -> Any:
    """The :class:`look.data.DataSpec` of a data section (``num_workers`` is the loader's)."""
    from look.data import DataSpec

    values = dataclasses.asdict(data)
    values.pop("num_workers")
    return DataSpec(**values)


def _validate_data(data: DataConfig) -> None:
    from look.data import validate_spec

    try:
        validate_spec(data_spec_from_config(data))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Validate a nested dict into a :class:`RunConfig` (method options are checked later)."""
    cfg = dataclass_from_dict(RunConfig, values, "")
    _validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of built-in types (safe for YAML, JSON and ``weights_only`` checkpoints)."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optim.lr=0.05'`` → (['optim', 'lr'], 0.05); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value, e.g. optim.lr=0.05")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override {text!r}: value is not valid YAML {yaml_problem(exc)}"
        ) from exc
    if "#" in raw and _without_comment_marks(raw) != value:
        # `data.root=batch #3` read as `batch` plus a comment: another folder, silently.
        fix = (
            "drop the comment, or quote the text inside that holds the '#'"
            if isinstance(value, (dict, list))
            else f"quote the value to keep its '#': --set '{key}=\"{raw.strip()}\"'"
        )
        raise ConfigError(
            f"override {text!r}: YAML reads ' #' as the start of a comment, so the value would "
            f"be {value!r}; {fix}"
        )
    return key.split("."), value


# A character YAML reads as a plain one, standing in for '#' to read a value as if it held no
# comment (a private-use code point: no value a user types holds it).
_HASH_STAND_IN = "\ue000"


def _without_comment_marks(raw: str) -> Any:
    """``raw`` read as YAML with every '#' taken literally (``None`` where that is no YAML)."""

    def restore(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(_HASH_STAND_IN, "#")
        if isinstance(value, list):
            return [restore(item) for item in value]
        if isinstance(value, dict):
            return {restore(k): restore(v) for k, v in value.items()}
        return value

    try:
        return restore(yaml.safe_load(raw.replace("#", _HASH_STAND_IN)))
    except yaml.YAMLError:
        return None


def apply_overrides(values: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``values`` with each ``key.path=value`` applied (creating method keys)."""
    result = copy.deepcopy(values)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        if isinstance(value, dict) and isinstance(node.get(path[-1]), dict) and path != ["method"]:
            # A mapping merges into a section, as a recipe does (`--set "optim={lr: 0.05}"` keeps
            # the recipe's batch size); only the method section is replaced whole, its options
            # being the method's own.
            node[path[-1]] = _deep_merge(node[path[-1]], value)
        else:
            node[path[-1]] = value
    return result


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML {yaml_problem(exc)}"
        ) from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return loaded


def recipe_folders() -> list[Path]:
    """Where recipe names are looked up, in order: the working directory's ``configs/``, the
    source tree's (a checkout or an editable install), then ``share/look/configs`` below every
    place pip may have put the package's data files: beside the package itself (``pip install
    --target DIR``), and each install scheme's data folder (a virtual environment's prefix,
    ``--user``, Debian's ``/usr/local``, ``--prefix``)."""
    import sysconfig

    package = Path(__file__).resolve().parent
    folders = [Path.cwd() / "configs"]
    source_tree = package.parents[1]
    if (source_tree / "pyproject.toml").is_file():  # src/look/ in a checkout
        folders.append(source_tree / "configs")
    data_roots = [package.parent, Path(sys.prefix)]
    for scheme in sysconfig.get_scheme_names():
        with contextlib.suppress(KeyError, ValueError):
            data_roots.append(Path(sysconfig.get_path("data", scheme)))
    folders += [root / "share" / "look" / "configs" for root in data_roots]
    return list(dict.fromkeys(folder.resolve() for folder in folders))


def resolve_recipe(name: str | Path) -> Path:
    """A YAML file's path as given, or a recipe name (``look_cnn-small_fmnist-coarse``, with or
    without ``.yaml``, or ``configs/NAME.yaml`` as the repository spells it) found in
    :func:`recipe_folders`; a FileNotFoundError lists the folders and the recipes found."""
    path = Path(name)
    if path.is_file():
        return path
    names = dict.fromkeys((str(name), f"{name}.yaml", path.name, f"{path.name}.yaml"))
    searched = recipe_folders()
    for folder in searched:
        for candidate in names:
            if (folder / candidate).is_file():
                return folder / candidate
    available = sorted(
        {found.stem for folder in searched if folder.is_dir() for found in folder.glob("*.yaml")}
    )
    folders = ", ".join(str(folder) for folder in searched)
    raise FileNotFoundError(
        f"config {str(name)!r} does not exist: not a file, and no recipe of that name in {folders}. "
        f"Recipes: {available}"
    )


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Defaults ← YAML recipe (a file, or a recipe name: :func:`resolve_recipe`) ← ``--set``
    overrides, validated."""
    values = to_dict(RunConfig())
    if path is not None:
        try:
            path = resolve_recipe(path)
        except FileNotFoundError as error:
            # (a ConfigError, like every other problem of a recipe)
            raise ConfigError(str(error)) from error
        values = _deep_merge(values, load_yaml(path))
    values = apply_overrides(values, overrides)
    _refuse_k_set_next_to_k_fraction(values, overrides)
    return config_from_dict(values)


def _refuse_k_set_next_to_k_fraction(
    values: dict[str, Any], overrides: typing.Sequence[str]
) -> None:
    """``--set method.k=200`` on a recipe with ``k_fraction``: the options' own check cannot tell
    that k from the default one (which a saved run's config also holds next to its
    k_fraction), and k_fraction would silently win."""
    given: set[str] = set()
    for text in overrides:
        path, value = parse_override(text)
        if path == ["method"] and isinstance(value, dict):
            given.update(value)
        elif len(path) == 2 and path[0] == "method":
            given.add(path[1])
    method = values.get("method")
    if (
        "k" in given
        and isinstance(method, dict)
        and method.get("k") is not None
        and method.get("k_fraction") is not None
    ):
        raise ConfigError(
            f"method: give k or k_fraction, not both (k={method['k']} from --set, "
            f"k_fraction={method['k_fraction']}); to override a recipe's one with the other, "
            "set it to null, e.g. --set method.k=50 --set method.k_fraction=null"
        )


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if key == "method" and isinstance(value, dict):
            # A recipe's method section replaces the default one: options differ between methods.
            merged[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def save_yaml(values: dict[str, Any], path: str | Path, *, header: str = "") -> None:
    """``values`` as YAML, after ``header`` (comment lines, each starting with ``#``)."""
    # Atomic: a run's config.yaml is rewritten on resume, and a reader must never see half.
    atomic_write_text(path, header + yaml.safe_dump(values, sort_keys=False))
