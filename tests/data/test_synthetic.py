from __future__ import annotations

import pytest
import torch

from look.data.synthetic import (
    MODES_PER_CLASS,
    make_synthetic_images,
    synthetic_coarse_grouping,
    synthetic_split_size,
)


def _make(
    split: str = "train", **overrides: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    arguments = {"num_samples": 240, "num_classes": 6, "image_size": 12} | overrides
    return make_synthetic_images(split=split, **arguments)


def test_same_arguments_give_identical_data() -> None:
    first, second = _make(), _make()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_shapes_types_and_balance() -> None:
    images, labels, modes = _make()
    assert images.shape == (240, 3, 12, 12) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and torch.bincount(labels).tolist() == [40] * 6
    assert set(modes.tolist()) == set(range(MODES_PER_CLASS))
    assert 0 < images.float().mean() < 255


def test_splits_share_patterns_but_not_images() -> None:
    train_images, train_labels, _ = _make("train")
    test_images, test_labels, _ = _make("test")
    assert len(test_images) == synthetic_split_size(240, 6, "test") == 60
    assert not torch.equal(train_images[:60], test_images)
    # Class-mean templates from train classify test images well: the classes are shared.
    templates = torch.stack([train_images[train_labels == c].float().mean(0) for c in range(6)])
    distances = ((test_images.float()[:, None] - templates[None]) ** 2).flatten(2).sum(2)
    accuracy = (distances.argmin(1) == test_labels).float().mean()
    assert accuracy > 0.9


def test_classes_are_multi_modal() -> None:
    images, labels, modes = _make(num_samples=600)
    pixels = images.float().flatten(1)
    for c in range(3):
        in_class = labels == c
        templates = torch.stack(
            [pixels[in_class & (modes == m)].mean(0) for m in range(MODES_PER_CLASS)]
        )
        distances = torch.cdist(pixels[in_class], templates)
        # Inside one class the modes are told apart by their templates: the class is not one blob.
        assert (distances.argmin(1) == modes[in_class]).float().mean() > 0.95


def test_different_seed_gives_different_data() -> None:
    assert not torch.equal(
        _make()[0], make_synthetic_images(num_samples=240, num_classes=6, image_size=12, seed=1)[0]
    )


def test_coarse_grouping_pairs_classes() -> None:
    grouping = synthetic_coarse_grouping(5)
    coarse_names, mapping = grouping.apply([f"class_{c}" for c in range(5)])
    assert coarse_names == ("group_0", "group_1", "group_2")
    assert mapping.tolist() == [0, 0, 1, 1, 2]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_samples >= num_classes"):
        make_synthetic_images(num_samples=3, num_classes=4, image_size=8)
    with pytest.raises(ValueError, match="splits"):
        make_synthetic_images(num_samples=8, num_classes=4, image_size=8, split="val")
