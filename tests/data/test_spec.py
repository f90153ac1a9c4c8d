from __future__ import annotations

import dataclasses

import pytest

from look.data.spec import (
    DATASET_NAMES,
    DataSpec,
    describe,
    infer_default_root,
    resolve_image_size,
    validate_spec,
)


def test_defaults_and_frozen() -> None:
    spec = DataSpec("fashion_mnist")
    assert (spec.split_train, spec.labels, spec.download, spec.augment, spec.corrupt_images) == (
        "train",
        "fine",
        False,
        "auto",
        "fail",
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.labels = "coarse"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("spec", "size"),
    [
        (DataSpec("fashion_mnist"), 28),
        (DataSpec("mnist"), 28),
        (DataSpec("cifar100"), 32),
        (DataSpec("digits"), 32),
        (DataSpec("imagefolder"), 224),
        (DataSpec("synthetic", synthetic_image_size=12), 12),
        (DataSpec("cifar10", image_size=64), 64),
    ],
)
def test_default_image_sizes(spec: DataSpec, size: int) -> None:
    assert resolve_image_size(spec) == size


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dataset": "imagenet21k"}, "imagenet21k"),
        ({"augment": "strong"}, "strong"),
        ({"corrupt_images": "ignore"}, "ignore"),
        ({"subset": 0}, "subset"),
        ({"image_size": 4}, "image_size"),
        ({"dataset": "synthetic", "synthetic_num_samples": 2}, "synthetic_num_samples"),
    ],
)
def test_validation_names_the_bad_field(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_spec(dataclasses.replace(DataSpec("cifar10"), **changes))


def test_default_roots() -> None:
    assert infer_default_root("digits") is None and infer_default_root("imagefolder") is None
    assert infer_default_root("cifar10").endswith("datasets")
    assert set(DATASET_NAMES) >= {"fashion_mnist", "synthetic"}
    with pytest.raises(ValueError, match="unknown dataset"):
        infer_default_root("svhn")


def test_describe_is_one_line() -> None:
    text = describe(DataSpec("cifar100", root="/data", labels="coarse", subset=5000))
    assert "\n" not in text
    for part in ("cifar100", "/data", "labels=coarse", "image_size=32", "subset=5000"):
        assert part in text
