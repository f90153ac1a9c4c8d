from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from look.data.groupings import (
    ClassGrouping,
    builtin_grouping_names,
    grouping_for_labels,
    load_grouping,
)
from look.data.sources import FASHION_MNIST_CLASSES

# torchvision's CIFAR100.classes (alphabetical), written out here independently of the JSON.
# fmt: off
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]
# fmt: on
# The dataset's own coarse label of each fine label (from the CIFAR-100 pickles' coarse_labels).
CIFAR100_COARSE_IDS = [
    4,
    1,
    14,
    8,
    0,
    6,
    7,
    7,
    18,
    3,
    3,
    14,
    9,
    18,
    7,
    11,
    3,
    9,
    7,
    11,
    6,
    11,
    5,
    10,
    7,
    6,
    13,
    15,
    3,
    15,
    0,
    11,
    1,
    10,
    12,
    14,
    16,
    9,
    11,
    5,
    5,
    19,
    8,
    8,
    15,
    13,
    14,
    17,
    18,
    10,
    16,
    4,
    17,
    4,
    2,
    0,
    17,
    4,
    18,
    17,
    10,
    3,
    2,
    12,
    12,
    16,
    12,
    1,
    9,
    19,
    2,
    10,
    0,
    1,
    16,
    12,
    9,
    13,
    15,
    13,
    16,
    19,
    2,
    4,
    6,
    19,
    5,
    5,
    8,
    19,
    18,
    1,
    2,
    15,
    6,
    0,
    17,
    8,
    14,
    13,
]  # fmt: skip


def test_shipped_groupings_are_listed() -> None:
    assert set(builtin_grouping_names()) >= {"fashion_mnist_coarse", "cifar100_coarse"}


def test_fashion_mnist_grouping_matches_method_md() -> None:
    grouping = load_grouping("fashion_mnist_coarse")
    coarse_names, mapping = grouping.apply(FASHION_MNIST_CLASSES)
    assert len(coarse_names) == 4
    groups = {
        frozenset(f for f, c in zip(FASHION_MNIST_CLASSES, mapping.tolist(), strict=True) if c == g)
        for g in range(4)
    }
    assert groups == {
        frozenset({"T-shirt/top", "Pullover", "Coat", "Shirt"}),
        frozenset({"Trouser", "Dress"}),
        frozenset({"Sandal", "Sneaker", "Ankle boot"}),
        frozenset({"Bag"}),
    }
    assert mapping.dtype == torch.int64


def test_cifar100_grouping_has_20_groups_of_5_over_all_100_classes() -> None:
    assert len(CIFAR100_CLASSES) == 100 == len(set(CIFAR100_CLASSES))
    grouping = load_grouping("cifar100_coarse")
    assert set(grouping.fine_to_coarse) == set(CIFAR100_CLASSES)
    coarse_names, mapping = grouping.apply(CIFAR100_CLASSES)
    assert len(coarse_names) == 20
    assert torch.bincount(mapping, minlength=20).tolist() == [5] * 20


def test_cifar100_grouping_matches_the_datasets_coarse_label_ids() -> None:
    coarse_names, mapping = load_grouping("cifar100_coarse").apply(CIFAR100_CLASSES)
    assert mapping.tolist() == CIFAR100_COARSE_IDS
    assert coarse_names[0] == "aquatic_mammals" and coarse_names[19] == "vehicles_2"


def test_missing_fine_class_is_listed() -> None:
    grouping = ClassGrouping("g", {"a": "x", "b": "y"}, ("x", "y"))
    with pytest.raises(ValueError, match=r"missing from the grouping: \['c'\]"):
        grouping.apply(["a", "b", "c"])


def test_unknown_grouping_key_is_listed() -> None:
    grouping = ClassGrouping("g", {"a": "x", "b": "y", "zebra": "y"}, ("x", "y"))
    with pytest.raises(ValueError, match=r"not classes of the dataset: \['zebra'\]"):
        grouping.apply(["a", "b"])


def test_both_problems_are_reported_together() -> None:
    grouping = ClassGrouping("g", {"a": "x", "typo": "y"}, ("x", "y"))
    with pytest.raises(ValueError, match=r"\['b'\].*\['typo'\]"):
        grouping.apply(["a", "b"])


def test_grouping_from_path_keeps_coarse_order_of_first_appearance(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"fine_to_coarse": {"c": "late", "a": "early", "b": "late"}}))
    grouping = load_grouping(path)
    assert grouping.name == "mine"
    coarse_names, mapping = grouping.apply(["a", "b", "c"])
    assert coarse_names == ("late", "early")
    assert mapping.tolist() == [1, 0, 0]


def test_declared_coarse_order_wins(tmp_path: Path) -> None:
    path = tmp_path / "ordered.json"
    content = {
        "name": "ordered",
        "coarse_classes": ["y", "x"],
        "fine_to_coarse": {"a": "x", "b": "y"},
    }
    path.write_text(json.dumps(content))
    assert load_grouping(path).apply(["a", "b"])[1].tolist() == [1, 0]


def test_a_plain_mapping_is_a_grouping_named_after_its_file(tmp_path: Path) -> None:
    path = tmp_path / "animals.json"
    path.write_text(json.dumps({"cat": "pet", "fox": "wild", "dog": "pet"}))
    grouping = load_grouping(path)
    assert grouping.name == "animals" and grouping.coarse_names == ("pet", "wild")
    assert grouping.apply(["cat", "dog", "fox"])[1].tolist() == [0, 0, 1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("{}", "must be a JSON object mapping fine class names"),
        # The plain form with a bad value says what is wrong with it, not that the form is.
        ('{"a": "x", "b": 2}', r"coarse class names must be non-empty strings, got \{'b': 2\}"),
        ('{"cat": 0}', r"non-empty strings, got \{'cat': 0\}"),
        ('{"cat": null}', "non-empty strings"),
        (
            '{"fine_to_coarse": {"a": "x"}, "coarse_class": ["x"]}',
            r"unknown key\(s\) \['coarse_class'\]",
        ),
        ('["a", "x"]', "must be a JSON object mapping fine class names"),
        ('{"name": "x"}', "fine_to_coarse"),
        ('{"fine_to_coarse": {}}', "empty"),
        ('{"fine_to_coarse": {"a": 3}}', "non-empty strings"),
        ('{"fine_to_coarse": {"a": "x", "a": "y"}}', "appears twice"),
        ('{"coarse_classes": ["x"], "fine_to_coarse": {"a": "x", "b": "y"}}', "exactly once"),
    ],
)
def test_malformed_grouping_files_are_rejected(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_grouping(path)


def test_unknown_grouping_name_names_the_path_and_the_shipped_ones(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar100_coarse.*no_such\.json"):
        load_grouping(tmp_path / "no_such.json")


def test_coarse_labels_need_a_shipped_grouping() -> None:
    assert grouping_for_labels("mnist", "fine") is None
    assert grouping_for_labels("cifar100", "coarse").name == "cifar100_coarse"
    with pytest.raises(ValueError, match="'mnist' has none"):
        grouping_for_labels("mnist", "coarse")


def test_a_class_named_name_is_a_class_in_the_plain_form(tmp_path: Path) -> None:
    path = tmp_path / "odd.json"
    path.write_text('{"name": "tag", "cat": "animal"}')
    assert load_grouping(path).coarse_names == ("tag", "animal")
