from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from look.data.spec import DATASET_NAMES
from look.data.transforms import (
    NORMALIZATION,
    ToNormalizedFloat,
    build_eval_transform,
    build_train_transform,
    normalization_stats,
    resolve_augment,
)


@pytest.mark.parametrize(
    ("image_size", "dataset", "expected"),
    [
        (28, "fashion_mnist", "crop_flip"),
        (28, "mnist", "crop"),
        (32, "digits", "crop"),
        (32, "cifar10", "crop_flip_jitter"),
        (32, "fashion_mnist", "crop_flip_jitter"),
        (224, "imagefolder", "resized_crop"),
        (224, "mnist", "resized_crop"),
    ],
)
def test_auto_recipe_by_size_and_dataset(image_size: int, dataset: str, expected: str) -> None:
    assert resolve_augment("auto", image_size, dataset) == expected
    assert resolve_augment("none", image_size, dataset) == "none"


def test_unknown_recipe() -> None:
    with pytest.raises(ValueError, match="'blur'"):
        resolve_augment("blur", 32, "cifar10")


def test_every_dataset_has_normalisation() -> None:
    assert set(NORMALIZATION) == set(DATASET_NAMES)
    mean, std = normalization_stats("cifar10")
    assert len(mean) == len(std) == 3


def test_fused_normalisation_matches_torchvision() -> None:
    image = torch.randint(0, 256, (1, 9, 7), dtype=torch.uint8)
    mean, std = (0.2, 0.3, 0.4), (0.5, 0.25, 0.125)
    expected = v2.Normalize(mean, std)(v2.ToDtype(torch.float32, scale=True)(image.repeat(3, 1, 1)))
    torch.testing.assert_close(ToNormalizedFloat(mean, std)(image), expected)


@pytest.mark.parametrize(
    ("recipe", "image_size", "native_size", "input_shape"),
    [
        ("crop", 28, 28, (1, 28, 28)),
        ("crop_flip", 28, 28, (1, 28, 28)),
        ("crop_flip", 32, 28, (1, 28, 28)),
        ("crop_flip_jitter", 32, 32, (3, 32, 32)),
        ("crop_flip_jitter", 32, 32, (1, 32, 32)),
        ("crop_flip_jitter", 32, None, (3, 50, 41)),
        ("resized_crop", 96, None, (3, 120, 90)),
        ("resized_crop", 96, None, (1, 120, 90)),
        ("resized_crop_blur", 28, 28, (1, 28, 28)),
        ("resized_crop_blur", 224, None, (3, 300, 260)),
        ("none", 28, 28, (1, 28, 28)),
    ],
)
def test_train_recipes_give_three_channel_normalised_floats(
    recipe: str, image_size: int, native_size: int | None, input_shape: tuple[int, ...]
) -> None:
    transform = build_train_transform(recipe, image_size, native_size, "cifar10")
    image = torch.randint(0, 256, input_shape, dtype=torch.uint8)
    output = transform(image)
    assert output.shape == (3, image_size, image_size) and output.dtype == torch.float32
    assert output.abs().max() < 5


def test_train_recipe_is_random_but_seedable() -> None:
    transform = build_train_transform("crop_flip", 28, 28, "fashion_mnist")
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    outputs = []
    for seed in (0, 0, 1, 2, 3):
        torch.manual_seed(seed)
        outputs.append(transform(image))
    assert torch.equal(outputs[0], outputs[1])
    assert any(not torch.equal(outputs[0], other) for other in outputs[2:])


def test_eval_transform_is_deterministic_and_fits_size() -> None:
    small = build_eval_transform(32, 28, "fashion_mnist")
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    assert small(image).shape == (3, 32, 32)
    assert torch.equal(small(image), small(image))
    identity_size = build_eval_transform(28, 28, "fashion_mnist")
    mean, std = normalization_stats("fashion_mnist")
    torch.testing.assert_close(identity_size(image)[0], (image[0].float() / 255 - mean[0]) / std[0])
    large = build_eval_transform(224, None, "imagefolder")
    assert large(torch.randint(0, 256, (3, 300, 260), dtype=torch.uint8)).shape == (3, 224, 224)


def test_transforms_do_not_modify_the_source_image() -> None:
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    original = image.clone()
    for recipe in ("crop_flip", "crop_flip_jitter", "resized_crop", "resized_crop_blur", "none"):
        build_train_transform(recipe, 28, 28, "fashion_mnist")(image)
    assert torch.equal(image, original)


@pytest.mark.parametrize(("image_size", "kernel"), [(28, 3), (32, 3), (96, 9), (224, 23)])
def test_moco_v2s_recipe_blurs_with_a_tenth_of_the_image_side(image_size: int, kernel: int) -> None:
    transform = build_train_transform("resized_crop_blur", image_size, None, "imagefolder")
    blurs = [
        step
        for apply in transform.transforms
        if isinstance(apply, v2.RandomApply)
        for step in apply.transforms
        if isinstance(step, v2.GaussianBlur)
    ]
    assert len(blurs) == 1 and list(blurs[0].kernel_size) == [kernel, kernel]
    assert tuple(blurs[0].sigma) == (0.1, 2.0)
    assert resolve_augment("resized_crop_blur", image_size, "mnist") == "resized_crop_blur"
