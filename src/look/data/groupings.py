"""Class groupings: data files that map each fine class name to a coarse class name.

A grouping is a JSON object ``{"name": ..., "fine_to_coarse": {"T-shirt/top": "Tops", ...}}`` with an
optional ``"coarse_classes"`` list that fixes the order of the coarse classes (otherwise: order of
first appearance in ``fine_to_coarse``) and an optional free-text ``"description"``. Shipped
groupings live in ``look/data/groupings/`` and are named by their file stem.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

# The grouping that ``labels="coarse"`` means for each dataset that ships one.
DATASET_COARSE_GROUPING: dict[str, str] = {
    "fashion_mnist": "fashion_mnist_coarse",
    "cifar100": "cifar100_coarse",
}


@dataclass(frozen=True)
class ClassGrouping:
    """A map from fine class names to coarse class names; ``coarse_names`` fixes the coarse order."""

    name: str
    fine_to_coarse: Mapping[str, str]
    coarse_names: tuple[str, ...]

    def apply(self, fine_class_names: Sequence[str]) -> tuple[tuple[str, ...], torch.Tensor]:
        """Map a dataset's fine classes to coarse ones.

        Returns the coarse class names and an int64 tensor ``fine_index -> coarse_index`` of length
        ``len(fine_class_names)``. Raises ``ValueError`` listing the dataset classes the grouping
        does not map and the grouping's keys that are not classes of the dataset.
        """
        # Names compared in Unicode's composed form (NFC): a folder name written decomposed
        # (NFD, as macOS tools write it) and a grouping typed composed look the same and are.
        by_form = {composed_name(key): coarse for key, coarse in self.fine_to_coarse.items()}
        if len(by_form) != len(self.fine_to_coarse):
            raise ValueError(
                f"class grouping {self.name!r} has keys that differ only in their Unicode form"
            )
        fine_set = {composed_name(name) for name in fine_class_names}
        unmapped = [name for name in fine_class_names if composed_name(name) not in by_form]
        unknown = [name for name in self.fine_to_coarse if composed_name(name) not in fine_set]
        if unmapped or unknown:
            problems = []
            if unmapped:
                problems.append(f"classes of the dataset missing from the grouping: {unmapped}")
            if unknown:
                problems.append(f"grouping keys that are not classes of the dataset: {unknown}")
            raise ValueError(
                f"class grouping {self.name!r} does not fit the dataset ({'; '.join(problems)}); "
                f"the dataset's classes are {list(fine_class_names)}"
            )
        coarse_index = {name: i for i, name in enumerate(self.coarse_names)}
        mapping = torch.tensor(
            [coarse_index[by_form[composed_name(name)]] for name in fine_class_names],
            dtype=torch.int64,
        )
        return self.coarse_names, mapping


def composed_name(name: str) -> str:
    """A class name in Unicode's composed form (NFC), the form names are compared in: a folder
    written decomposed (NFD, as macOS tools write it) names the same class."""
    return unicodedata.normalize("NFC", name)


def builtin_grouping_names() -> tuple[str, ...]:
    """Names of the groupings shipped in ``look/data/groupings/``."""
    folder = resources.files("look.data") / "groupings"
    return tuple(
        sorted(
            entry.name[: -len(".json")]
            for entry in folder.iterdir()
            if entry.name.endswith(".json")
        )
    )


def load_grouping(name_or_path: str | Path) -> ClassGrouping:
    """Load a shipped grouping by name (e.g. ``"cifar100_coarse"``) or a grouping JSON by path.

    Raises ``FileNotFoundError`` when neither exists and ``ValueError`` when the file is malformed.
    """
    text_name = str(name_or_path)
    if text_name in builtin_grouping_names():
        resource = resources.files("look.data") / "groupings" / f"{text_name}.json"
        return parse_grouping(
            resource.read_text(encoding="utf-8"), source=f"shipped grouping {text_name}"
        )
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"class grouping {text_name!r} is neither a shipped grouping "
            f"({', '.join(builtin_grouping_names())}) nor an existing JSON file (looked at {path.resolve()})"
        )
    return parse_grouping(
        path.read_text(encoding="utf-8"), source=str(path), default_name=path.stem
    )


def parse_grouping(text: str, *, source: str, default_name: str | None = None) -> ClassGrouping:
    """Parse grouping JSON ``text``; ``source`` names it in error messages."""

    def reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise ValueError(f"{source}: key {key!r} appears twice")
            seen[key] = value
        return seen

    try:
        content = json.loads(text, object_pairs_hook=reject_duplicates)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source} is not valid JSON: {error}") from error
    described = {"name", "coarse_classes", "description"}  # what may stand beside the mapping
    if (
        isinstance(content, dict)
        and "fine_to_coarse" not in content
        and not set(content) <= described
    ):
        # The plain form, {"cat": "animal", ...}: every key is a class (one named "name" too),
        # so a bad value gets the message about values below.
        content = {"fine_to_coarse": content}
    elif isinstance(content, dict) and "fine_to_coarse" in content:
        unknown = sorted(set(content) - described - {"fine_to_coarse"})
        if unknown:
            raise ValueError(
                f'{source}: unknown key(s) {unknown} beside "fine_to_coarse"; the others allowed '
                f"are {sorted(described)}"
            )
    if not isinstance(content, dict) or not isinstance(content.get("fine_to_coarse"), dict):
        raise ValueError(
            f"{source} must be a JSON object mapping fine class names to coarse class names, "
            'e.g. {"cat": "animal", "dog": "animal"}, or one with that mapping under '
            '"fine_to_coarse" (and optional "name", "coarse_classes"), e.g. '
            '{"name": "mine", "fine_to_coarse": {"cat": "animal"}}'
        )
    fine_to_coarse = content["fine_to_coarse"]
    if not fine_to_coarse:
        raise ValueError(f'{source}: "fine_to_coarse" is empty')
    bad_values = {k: v for k, v in fine_to_coarse.items() if not isinstance(v, str) or not v}
    if bad_values:
        raise ValueError(
            f"{source}: coarse class names must be non-empty strings, got {bad_values}"
        )
    first_seen_order = tuple(dict.fromkeys(fine_to_coarse.values()))
    coarse_names = first_seen_order
    if "coarse_classes" in content:
        declared = content["coarse_classes"]
        if not isinstance(declared, list) or not all(isinstance(c, str) for c in declared):
            raise ValueError(f'{source}: "coarse_classes" must be a list of strings')
        if len(set(declared)) != len(declared) or set(declared) != set(first_seen_order):
            raise ValueError(
                f'{source}: "coarse_classes" {declared} must list each coarse class used in '
                f'"fine_to_coarse" exactly once ({sorted(first_seen_order)})'
            )
        coarse_names = tuple(declared)
    name = content.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise ValueError(f'{source}: "name" must be a non-empty string')
    return ClassGrouping(name=name, fine_to_coarse=dict(fine_to_coarse), coarse_names=coarse_names)


def grouping_for_labels(dataset: str, labels: str) -> ClassGrouping | None:
    """The grouping that ``data.labels`` asks for (``None`` for ``"fine"``).

    ``"coarse"`` means the dataset's shipped grouping; synthetic data builds its own (see
    :func:`look.data.synthetic.synthetic_coarse_grouping`) and is handled by the caller.
    """
    if labels == "fine":
        return None
    if labels == "coarse":
        if dataset not in DATASET_COARSE_GROUPING:
            raise ValueError(
                f"data.labels='coarse' needs a shipped grouping, and {dataset!r} has none "
                f"(shipped: {', '.join(f'{d}: {g}' for d, g in DATASET_COARSE_GROUPING.items())}); "
                "pass a path to a grouping JSON instead: --set data.labels=path/to/grouping.json"
            )
        return load_grouping(DATASET_COARSE_GROUPING[dataset])
    return load_grouping(labels)
